"""Power policy of free desktops: keep running, managed save, shut down, or leave alone.

Every start, shutdown and managed save runs under the host's power throttle
(``hosts.NAME.limits.power``), so a wave of logoffs or logins cannot boot-storm it.
"""

from __future__ import annotations

import logging
import time

import libvirt

from orchestrator.errors import GuestError, HostError
from orchestrator.hosts.context import HostContext
from orchestrator.provision import readiness
from orchestrator.provision.steps import EventSink
from orchestrator.state import events
from orchestrator.state.metadata import DesktopRecord

log = logging.getLogger(__name__)

# Seconds a guest gets to power off after the ACPI power button before it is destroyed.
SHUTDOWN_TIMEOUT = 120.0


def apply_policy(ctx: HostContext, domain: libvirt.virDomain, record: DesktopRecord,
                 policy: str, on_event: EventSink) -> None:
    """Put a free desktop into the state its pool's power policy keeps free desktops in."""
    name = domain.name()
    if policy in ("always-on", "none") or not domain.isActive():
        return
    with ctx.power:
        if policy == "suspend":
            on_event(name, "power", "managed save")
            _call(domain.managedSave, name, "saving its memory (managed save)", 0)
        elif policy == "power-off":
            on_event(name, "power", "shut down")
            shutdown(domain)
    message = f"power policy {policy} applied"
    log.info("pool %s, desktop %s: %s", record.pool, name, message)
    events.record(record.inventory, "power", message, pool=record.pool, desktop=name)


def shutdown(domain: libvirt.virDomain, timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Shut a domain down through ACPI; destroy it if it is still running after ``timeout``."""
    name = domain.name()
    _call(domain.shutdown, name, "shutting it down")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not domain.isActive():
            return
        time.sleep(1.0)
    log.warning("%s: still running %.0f s after the ACPI shutdown; powering it off", name,
                timeout)
    _call(domain.destroy, name, "powering it off")


def start(ctx: HostContext, domain: libvirt.virDomain, on_event: EventSink) -> bool:
    """Start a shut-off or managed-saved desktop; return whether it had to be started."""
    name = domain.name()
    if domain.isActive():
        return False
    with ctx.power:
        on_event(name, "power", "start")
        _call(domain.create, name, "starting it")
    return True


def wait_running(domain: libvirt.virDomain, record: DesktopRecord, access_key: str,
                 on_event: EventSink, *, timeout: float) -> None:
    """Wait until a started desktop's guest agent responds and, with a forward, SSH works."""
    name = domain.name()
    # NOTE: a desktop on a libvirt network or bridge has no SSH forward, so only its agent
    # and identity are checked here, not its SSH login.
    expected = readiness.Expected(
        hostname=record.hostname, machine_id=record.machine_id,
        ssh_address="127.0.0.1" if record.ssh_port else "", ssh_port=record.ssh_port,
        login_user=record.extra.get("login_user", "root"),
        host_key=record.extra.get("ssh_host_key", ""),
    )
    try:
        readiness.wait_ready(domain, expected, access_key, timeout=timeout)
    except GuestError as exc:
        raise GuestError(f"started, but not ready: {exc.message}", where=name,
                         fix=exc.fix) from exc
    on_event(name, "power", "running")


def _call(method, name: str, what: str, *args: int) -> None:
    try:
        method(*args)
    except libvirt.libvirtError as exc:
        raise HostError(f"{what} failed: {exc.get_error_message()}", where=name,
                        fix="check the domain with virsh dominfo") from exc
