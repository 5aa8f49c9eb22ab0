"""The NIC of an instant clone, hot-plugged after the fork with the child's own MAC.

Parents have no NIC: a NIC's state travels in the migration stream, so a child of a
parent with one would show the parent's MAC inside the guest whatever its XML contains.
User-mode NICs are QEMU arguments libvirt does not know, so they are plugged through
the monitor; NICs on libvirt networks and bridges through libvirt's device API.
"""

from __future__ import annotations

import json
import logging

import libvirt
import libvirt_qemu

from orchestrator import render
from orchestrator.domain import Interface, UserNetwork
from orchestrator.errors import GuestError
from orchestrator.provision.request import NetworkSpec

log = logging.getLogger(__name__)

DEVICE_ID = "labnic0"


def hot_plug(domain: libvirt.virDomain, network: NetworkSpec, mac: str, ssh_port: int) -> None:
    """Plug the child's NIC into the running ``domain``; "none" plugs nothing."""
    if network.mode == "none":
        return
    if network.mode == "user":
        _plug_user(domain, UserNetwork(mac, ssh_port))
        return
    xml = render.render("interface.xml.j2", nic=Interface(network.mode, network.source, mac))
    try:
        domain.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise GuestError(f"hot-plugging the NIC failed: {exc.get_error_message()}",
                         where=domain.name(), fix="check the libvirt network or bridge") from exc


def _plug_user(domain: libvirt.virDomain, user: UserNetwork) -> None:
    """netdev_add and device_add, the run-time form of UserNetwork.qemu_args()."""
    netdev: dict[str, object] = {"type": "user", "id": user.netdev_id, "restrict": True,
                                 "ipv6": False}
    if user.ssh_port:
        netdev["hostfwd"] = [{"str": f"tcp:127.0.0.1:{user.ssh_port}-:22"}]
    _monitor(domain, "netdev_add", netdev)
    # The same PCI slot as in the cold definition, so the guest names the NIC the same
    # after a later cold boot.
    _monitor(domain, "device_add", {"driver": "virtio-net-pci", "id": DEVICE_ID,
                                    "netdev": user.netdev_id, "mac": user.mac,
                                    "bus": "pci.0", "addr": user.pci_slot})


def _monitor(domain: libvirt.virDomain, execute: str, arguments: dict[str, object]) -> object:
    request = json.dumps({"execute": execute, "arguments": arguments})
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, request, 0))
    except libvirt.libvirtError as exc:
        raise GuestError(f"{execute} failed: {exc.get_error_message()}",
                         where=domain.name()) from exc
    if "error" in reply:
        raise GuestError(f"{execute} failed: {reply['error'].get('desc', reply['error'])}",
                         where=domain.name(), fix="the domain needs <acpi/> for PCI hot-plug")
    return reply.get("return")
