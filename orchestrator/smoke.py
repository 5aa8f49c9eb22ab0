"""The smoke path: one linked desktop built, booted, read back through the agent, removed.

It exercises the same code as ``labctl apply`` (replica, overlay, seed, domain,
readiness) with a throw-away inventory name, and always cleans up.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from dataclasses import dataclass

import libvirt

from orchestrator.hosts.context import HostContext, HostSettings, open_host
from orchestrator.identity import keys
from orchestrator.images.catalog import ImageVersion
from orchestrator.apply import provision
from orchestrator.provision.readiness import read_identity
from orchestrator.provision.remove import remove_desktop
from orchestrator.provision.request import DesktopRequest, NetworkSpec
from orchestrator.provision.steps import EventSink
from orchestrator.storage import replica

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmokeResult:
    name: str
    hostname: str
    machine_id: str
    accelerator: str
    timings: dict[str, float]


def run_smoke(image: ImageVersion, settings: HostSettings, on_event: EventSink, *,
              memory_bytes: int = 512 << 20, timeout: float = 900) -> SmokeResult:
    """Boot one linked clone of ``image``, read its identity back, then remove everything."""
    suffix = secrets.token_hex(3)
    inventory = f"smoke-{suffix}"
    name = f"smoke-{suffix}"
    ctx = open_host(settings)
    access_key = keys.access_key(inventory)
    request = DesktopRequest(
        name=name, inventory=inventory, pool="smoke", index=1, clone="linked", image=image,
        host=settings.name, memory_bytes=memory_bytes, network=NetworkSpec("user", "user"),
        ready_timeout=timeout,
    )
    try:
        timings = provision(ctx, request, access_key, on_event)
        hostname, machine_id = read_identity(ctx.conn.lookupByName(name))
        return SmokeResult(name, hostname, machine_id, ctx.accelerator, timings)
    finally:
        _clean_up(ctx, name, inventory, on_event)
        ctx.close()


def _clean_up(ctx: HostContext, name: str, inventory: str, on_event: EventSink) -> None:
    try:
        domain = ctx.conn.lookupByName(name)
    except libvirt.libvirtError:
        domain = None
    if domain is not None:
        remove_desktop(ctx, domain, inventory, on_event)
    with ctx.maintenance:
        replica.remove_unused(ctx.pool)
    key_dir = keys.access_key_path(inventory).parent
    if key_dir.exists():
        shutil.rmtree(key_dir)
