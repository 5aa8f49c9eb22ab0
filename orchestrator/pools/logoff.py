"""labctl release: end a session and run the pool's logoff action and power policy.

keep leaves the desktop as it is, unless its overlay grew past refresh_over: then it is
refreshed like with refresh. refresh re-creates it under the same name, UUID and MAC on
a clean disk (a dedicated desktop stays assigned to its user). delete removes it, and the
pool's sizing makes a new spare at the next apply. A kept or refreshed desktop is then
put into the state the power policy keeps free desktops in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import libvirt

from orchestrator import recompose
from orchestrator.apply import refresh_desktop
from orchestrator.errors import LabctlError
from orchestrator.hosts.context import HostContext
from orchestrator.identity import keys
from orchestrator.inventory import Inventory
from orchestrator.plan import make_plan, overlay_growth
from orchestrator.pools import power, sessions
from orchestrator.pools.claims import pool_lock
from orchestrator.provision.remove import remove_desktop
from orchestrator.provision.steps import EventSink
from orchestrator.state import events, metadata
from orchestrator.state.metadata import DesktopRecord

log = logging.getLogger(__name__)


@dataclass
class Release:
    """The outcome of a release: whose session ended and which logoff action ran."""

    desktop: str
    pool: str
    user: str
    action: str  # keep, refresh or delete
    reason: str = ""


def release(inventory: Inventory, ctx: HostContext, desktop: str,
            on_event: EventSink) -> Release:
    """End the session on ``desktop`` and carry out its pool's logoff action."""
    domain, record = sessions.find_desktop(inventory, ctx, desktop)
    with pool_lock(inventory.name, record.pool):
        record = metadata.read(domain)
        if not record.session_user:
            raise LabctlError(f"desktop {desktop} has no session to release", where=desktop,
                              fix=f"labctl status {inventory.path} shows who uses which desktop")
        result = Release(desktop, record.pool, record.session_user, *_logoff_action(
            inventory, desktop, record))
        record.session_user = ""
        record.session_since = ""
        if result.action != "keep":
            record.state = "refreshing" if result.action == "refresh" else "deleting"
        metadata.write(domain, record)
    _note(inventory, result, f"{result.user} released it; logoff action {result.action}"
          + (f" ({result.reason})" if result.reason else ""))
    _carry_out(inventory, ctx, domain, result, on_event)
    return result


def _logoff_action(inventory: Inventory, desktop: str,
                   record: DesktopRecord) -> tuple[str, str]:
    pool = inventory.pools.get(record.pool)
    if pool is None:
        return "keep", "its pool is no longer in the inventory"
    target = record.extra.get(recompose.MARK)
    if target and pool.logoff != "delete":
        return "refresh", f"a recompose to {target} waited for this logoff"
    if pool.logoff == "keep":
        grown = overlay_growth(desktop, pool, _free(record))
        return ("refresh", grown) if grown else ("keep", "")
    return pool.logoff, ""


def _free(record: DesktopRecord) -> DesktopRecord:
    """Return a copy of the record without its session, as it is once released."""
    copy = metadata.from_xml(metadata.to_xml(record))
    copy.session_user = ""
    return copy


def _carry_out(inventory: Inventory, ctx: HostContext, domain: libvirt.virDomain,
               result: Release, on_event: EventSink) -> None:
    if result.action == "delete":
        remove_desktop(ctx, domain, inventory.name, on_event)
        _note(inventory, result, "deleted at logoff")
        return
    if result.action == "refresh":
        domain = _refresh(inventory, ctx, result, on_event)
        _note(inventory, result, "refreshed at logoff")
    pool = inventory.pools.get(result.pool)
    record = metadata.read(domain)
    if pool is not None and record is not None:
        power.apply_policy(ctx, domain, record, pool.power_policy, on_event)


def _refresh(inventory: Inventory, ctx: HostContext, result: Release,
             on_event: EventSink) -> libvirt.virDomain:
    """Re-create the desktop from the inventory's request for it; return the new domain."""
    plan = make_plan(inventory, build_images=True)
    try:
        action = next((a for a in plan.actions if a.desktop == result.desktop), None)
        if action is None or action.request is None:
            raise LabctlError(f"{result.desktop} is no longer a desktop of the inventory, so "
                              "it cannot be refreshed", where=result.desktop,
                              fix="labctl apply removes it")
        domain = ctx.conn.lookupByName(result.desktop)
        record = metadata.read(domain)
        # A desktop a recompose marked moves to the new image and the old one's replica
        # or parent goes once unused. Otherwise it is a plain refresh.
        if record is None or not recompose.recompose_on_release(
                ctx, inventory.name, domain, record, action.request, on_event):
            access_key = keys.access_key(inventory.name, create=False)
            refresh_desktop(ctx, inventory.name, action.request, access_key, on_event)
    finally:
        plan.close()
    return ctx.conn.lookupByName(result.desktop)


def _note(inventory: Inventory, result: Release, message: str) -> None:
    log.info("pool %s, desktop %s: %s", result.pool, result.desktop, message)
    events.record(inventory.name, "release", message, pool=result.pool,
                  desktop=result.desktop)
