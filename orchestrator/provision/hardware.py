"""Changing a desktop's vCPUs and memory in place, keeping its disks and identity."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

import libvirt

from orchestrator.errors import LabctlError
from orchestrator.hosts.context import HostContext
from orchestrator.provision.request import DesktopRequest
from orchestrator.provision.steps import EventSink
from orchestrator.state import metadata

log = logging.getLogger(__name__)

ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")


def update_hardware(ctx: HostContext, domain: libvirt.virDomain, request: DesktopRequest,
                    on_event: EventSink) -> None:
    """Write the new vCPUs and memory into the persistent definition.

    NOTE: a running desktop keeps its old hardware until its next power cycle; labctl
    does not restart it, so no session is cut.
    """
    name = domain.name()
    on_event(name, "update", "start")
    root = ET.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    kib = str(request.memory_bytes // 1024)
    for tag in ("memory", "currentMemory"):
        element = root.find(tag)
        if element is not None:
            element.set("unit", "KiB")
            element.text = kib
    vcpu = root.find("vcpu")
    if vcpu is not None:
        vcpu.text = str(request.vcpus)
    try:
        domain = ctx.conn.defineXML(ET.tostring(root, encoding="unicode"))
    except libvirt.libvirtError as exc:
        raise LabctlError(f"redefining the domain failed: {exc.get_error_message()}",
                          where=name) from exc
    record = metadata.read(domain)
    if record is not None:
        record.extra["hardware_hash"] = request.hardware_hash()
        metadata.write(domain, record)
    on_event(name, "update", "done (takes effect at the next power cycle)"
             if domain.isActive() else "done")
