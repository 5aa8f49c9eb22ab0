"""recompose (push image): move a pool's desktops to the image version the inventory names now.

The roll re-creates each out-of-date desktop under its identity (name, UUID, MAC, SSH
port, assigned user). Free desktops go first, at most the host's ``limits.provisioning``
at a time. A desktop is taken down only while at least ``recompose.min_ready`` other
free desktops stay ready. A desktop in use is marked (``extra["recompose"]``)
and recomposed when it is released (wait-for-logoff), or after ``recompose.grace``
seconds with its session ended (force). Rolling back is the same operation with the old
version pinned in the inventory.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import libvirt

from orchestrator import cancel
from orchestrator.apply import recreate_desktop
from orchestrator.errors import InventoryError, LabctlError
from orchestrator.hosts.context import HostContext
from orchestrator.identity import keys
from orchestrator.instant import parent
from orchestrator.inventory.model import RecomposePolicy
from orchestrator.plan import Action, Plan
from orchestrator.provision.remove import remove_unused_bases
from orchestrator.provision.request import DesktopRequest
from orchestrator.provision.steps import EventSink
from orchestrator.state import events, metadata
from orchestrator.state.metadata import DesktopRecord

log = logging.getLogger(__name__)

MARK = "recompose"  # record.extra key: the image ref a desktop in use waits for
DEADLINE = "recompose_after"  # force: ISO 8601 UTC time its session is ended


@dataclass
class RecomposeResult:
    recomposed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # in use, recomposed at release
    failed: dict[str, LabctlError] = field(default_factory=dict)
    not_done: list[str] = field(default_factory=list)  # left when a roll stopped
    up_to_date: list[str] = field(default_factory=list)


@dataclass
class _Roll:
    """One pool's roll: its host, policy, and the free ready desktops left."""

    plan: Plan
    pool_key: str
    ctx: HostContext
    access_key: keys.KeyPair
    on_event: EventSink
    result: RecomposeResult
    ready: set[str]
    stopped: bool = False

    @property
    def policy(self) -> RecomposePolicy:
        return self.plan.inventory.pools[self.pool_key].recompose

    @property
    def inventory(self) -> str:
        return self.plan.inventory.name


def check_pools(plan: Plan, names: list[str]) -> list[str]:
    """Return the pools to recompose (all if ``names`` is empty); unknown names fail."""
    known = list(plan.inventory.pools)
    for name in names:
        if name not in known:
            raise InventoryError(
                f"pool {name} is not in inventory {plan.inventory.name} (its pools: "
                f"{', '.join(known) or 'none'})",
                where=plan.inventory.where(("pools",)),
                fix="name a pool of the inventory, or none for all of them",
            )
    return names or known


def recompose(plan: Plan, pools: list[str], on_event: EventSink, *, wait: bool = True,
              sleep: Callable[[float], None] = time.sleep) -> RecomposeResult:
    """Roll the out-of-date desktops of ``pools`` to the inventory's image versions.

    The plan resolved every image first, so an image missing from the catalog failed
    before anything was touched. With ``wait=False``, a force pool's desktops in use whose
    grace period has not ended stay waiting, for a later run (the deadline is recorded).
    """
    result = RecomposeResult()
    rolls = []
    # An inventory without desktops may have no key yet; one with desktops must have it.
    has_desktops = any(action.record is not None for action in plan.actions)
    access_key = keys.access_key(plan.inventory.name, create=not has_desktops)
    for pool_key in check_pools(plan, pools):
        actions = [a for a in plan.actions if a.pool == pool_key and a.record is not None]
        if not actions:
            continue
        ctx = plan.hosts[actions[0].host]
        roll = _Roll(plan, pool_key, ctx, access_key, on_event, result,
                     ready=_free_ready(ctx, actions))
        rolls.append((roll, _split(roll, actions)))
    for roll, (free, busy) in rolls:
        _check_min_ready(roll, free)
    for roll, (free, busy) in rolls:
        _run_roll(roll, free)
        if roll.stopped:
            # A stopped roll marks nothing, so no release recomposes a desktop after it.
            roll.result.not_done += [action.desktop for action in busy]
        else:
            _mark_busy(roll, busy)
    for roll, (_free, busy) in rolls:
        if busy and roll.policy.strategy == "force" and not roll.stopped:
            _force(roll, busy, sleep if wait else None)
    for key, ctx in plan.hosts.items():
        remove_unused_bases(ctx, plan.inventory.name, _parent_keys(plan, key), on_event)
    return result


def _parent_keys(plan: Plan, host: str) -> set[str]:
    ctx = plan.hosts[host]
    return {parent.parent_key(a.request, a.request.instant, ctx.domain_type)
            for a in plan.actions
            if a.host == host and a.request is not None and a.request.clone == "instant"}


def _outdated(action: Action) -> bool:
    return action.kind in ("outdated", "replace")


def _split(roll: _Roll, actions: list[Action]) -> tuple[list[Action], list[Action]]:
    """Return the free and the in-use desktops to recompose; note the up-to-date ones."""
    free, busy = [], []
    for action in actions:
        assert action.record is not None
        if not _outdated(action):
            roll.result.up_to_date.append(action.desktop)
            if action.record.extra.get(MARK):
                _clear_mark(roll.ctx, action.desktop)  # rolled back before its release
            continue
        (busy if action.record.session_user else free).append(action)
    # Desktops that are not ready go first: taking them down costs no ready desktop.
    free.sort(key=lambda a: (a.desktop in roll.ready, a.desktop))
    return free, busy


def _free_ready(ctx: HostContext, actions: list[Action]) -> set[str]:
    """Return the desktops ready for a new login: recorded ready, running and not in use."""
    ready = set()
    for action in actions:
        record = action.record
        if record is None or record.state != "ready" or record.session_user:
            continue
        try:
            if ctx.conn.lookupByName(action.desktop).isActive():
                ready.add(action.desktop)
        except libvirt.libvirtError:
            continue
    return ready


def _check_min_ready(roll: _Roll, free: list[Action]) -> None:
    """Reject, before touching anything, a roll that min_ready would block at once."""
    if not any(action.desktop in roll.ready for action in free):
        return
    if len(roll.ready) - 1 < roll.policy.min_ready:
        raise InventoryError(
            f"pool {roll.pool_key} has {len(roll.ready)} free ready desktops and "
            f"recompose.min_ready is {roll.policy.min_ready}, so no desktop may be taken "
            "down to recompose it",
            where=roll.plan.inventory.where(("pools", roll.pool_key, "recompose")),
            fix=f"lower min_ready: below {len(roll.ready)}, or wait until desktops are free",
        )


def _mark_busy(roll: _Roll, busy: list[Action]) -> None:
    for action in busy:
        assert action.request is not None and action.record is not None
        domain = roll.ctx.conn.lookupByName(action.desktop)
        record = metadata.read(domain)
        if record is None:
            continue
        message = f"in use by {record.session_user}: recomposed to {action.request.image.ref}"
        if roll.policy.strategy == "force":
            if record.extra.get(MARK) != action.request.image.ref or DEADLINE not in record.extra:
                # A later run for the same image keeps the deadline the first run set.
                deadline = datetime.now(timezone.utc) + timedelta(seconds=roll.policy.grace)
                record.extra[DEADLINE] = deadline.isoformat(timespec="seconds")
            message += f" at {record.extra[DEADLINE]}, its session ended"
        else:
            message += " when it is released"
        record.extra[MARK] = action.request.image.ref
        metadata.write(domain, record)
        _event(roll, action.desktop, "recompose-wait", message)
        roll.result.waiting.append(action.desktop)


def _run_roll(roll: _Roll, actions: list[Action]) -> None:
    """Recompose ``actions`` at most limits.provisioning at a time, keeping min_ready."""
    pending = deque(actions)
    limit = max(1, roll.ctx.settings.max_parallel)
    running: dict[Future, Action] = {}
    with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="recompose") as executor:
        try:
            while pending or running:
                _start_more(roll, pending, running, executor, limit)
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    _finish(roll, running.pop(future), future)
        except KeyboardInterrupt:
            cancel.request()
            raise
    roll.result.not_done += [action.desktop for action in pending]
    if pending:
        _event(roll, "", "recompose-stopped",
               f"not recomposed: {', '.join(a.desktop for a in pending)}")


def _start_more(roll: _Roll, pending: deque, running: dict, executor: ThreadPoolExecutor,
                limit: int) -> None:
    while pending and len(running) < limit and not roll.stopped:
        action = pending[0]
        if action.desktop in roll.ready:
            if len(roll.ready) - 1 < roll.policy.min_ready:
                return  # wait for a running recompose to bring a desktop back
            roll.ready.discard(action.desktop)
        pending.popleft()
        running[executor.submit(_recompose_one, roll, action)] = action


def _finish(roll: _Roll, action: Action, future: Future) -> None:
    try:
        future.result()
    except LabctlError as exc:
        roll.result.failed[action.desktop] = exc
        _event(roll, action.desktop, "recompose-failed", str(exc))
        if roll.policy.stop_on_error:
            roll.stopped = True
        return
    roll.ready.add(action.desktop)
    roll.result.recomposed.append(action.desktop)


def _recompose_one(roll: _Roll, action: Action) -> None:
    assert action.request is not None and action.record is not None
    _event(roll, action.desktop, "recompose",
           f"{action.record.image} -> {action.request.image.ref}")
    recreate_desktop(roll.ctx, roll.inventory, action.request, roll.access_key, roll.on_event)
    _event(roll, action.desktop, "recompose", f"done: on {action.request.image.ref}")


def _force(roll: _Roll, busy: list[Action], sleep: Callable[[float], None] | None) -> None:
    """Wait out the grace period, end the sessions still open and recompose those desktops.

    Without ``sleep``, only desktops whose grace period has already ended are recomposed.
    """
    if sleep is None:
        now = datetime.now(timezone.utc)
        busy = [a for a in busy if _deadline_of(roll.ctx, [a], now) <= now]
        if not busy:
            return
    deadline = _deadline_of(roll.ctx, busy, datetime.now(timezone.utc))
    left = (deadline - datetime.now(timezone.utc)).total_seconds()
    if left > 0 and sleep is not None:
        log.info("pool %s: %d desktops in use, recomposed in %.0f s", roll.pool_key,
                 len(busy), left)
        sleep(left)
    still = []
    for action in busy:
        record = _end_session(roll, action)
        if record is not None:
            still.append(action)
        roll.result.waiting.remove(action.desktop)
    _run_roll(roll, still)


def _deadline_of(ctx: HostContext, busy: list[Action], latest: datetime) -> datetime:
    """Return the latest recorded deadline of ``busy``, or ``latest`` if it is later."""
    for action in busy:
        record = metadata.read(ctx.conn.lookupByName(action.desktop))
        if record is not None and record.extra.get(DEADLINE):
            latest = max(latest, datetime.fromisoformat(record.extra[DEADLINE]))
    return latest


def _end_session(roll: _Roll, action: Action) -> DesktopRecord | None:
    """End the session of a desktop still waiting for recompose; None if it no longer waits
    (it was released and recomposed meanwhile)."""
    try:
        domain = roll.ctx.conn.lookupByName(action.desktop)
    except libvirt.libvirtError:
        return None
    record = metadata.read(domain)
    if record is None or not record.extra.get(MARK):
        return None
    if record.session_user:
        _event(roll, action.desktop, "session-ended",
               f"session of {record.session_user} ended after the recompose grace period "
               f"of {roll.policy.grace} s")
        record.session_user = record.session_since = ""
        metadata.write(domain, record)
    return record


def _clear_mark(ctx: HostContext, name: str) -> None:
    domain = ctx.conn.lookupByName(name)
    record = metadata.read(domain)
    if record is not None:
        record.extra.pop(MARK, None)
        record.extra.pop(DEADLINE, None)
        metadata.write(domain, record)


def _event(roll: _Roll, desktop: str, kind: str, message: str) -> None:
    log.info("pool %s%s: %s: %s", roll.pool_key, f" desktop {desktop}" if desktop else "",
             kind, message)
    roll.on_event(desktop or roll.pool_key, kind, message)
    events.record(roll.inventory, kind, message, pool=roll.pool_key, desktop=desktop)


def recompose_on_release(ctx: HostContext, inventory: str, domain: libvirt.virDomain,
                         record: DesktopRecord, request: DesktopRequest,
                         on_event: EventSink) -> bool:
    """Recompose a desktop marked by a wait-for-logoff recompose; return whether it was.

    ``labctl release`` calls this after it has cleared the session (metadata written),
    with the desktop's request from the plan. A desktop without the mark, or already on
    the request's image, is left alone (the mark is dropped).
    """
    target = record.extra.get(MARK)
    if not target:
        return False
    if record.config_hash == request.config_hash():
        _clear_mark(ctx, domain.name())
        return False
    name = domain.name()
    log.info("pool %s desktop %s: recompose at release: %s -> %s", record.pool, name,
             record.image, request.image.ref)
    events.record(inventory, "recompose", f"at release: {record.image} -> {request.image.ref}",
                  pool=record.pool, desktop=name)
    old_backing = _backing_of(domain)
    access_key = keys.access_key(inventory, create=False)
    recreate_desktop(ctx, inventory, request, access_key, on_event)
    events.record(inventory, "recompose", f"done: on {request.image.ref}", pool=record.pool,
                  desktop=name)
    keep = {r.key for _d, r in parent.inventory_parents(ctx.conn, inventory)
            if r.disk != old_backing}
    remove_unused_bases(ctx, inventory, keep, on_event)
    return True


def _backing_of(domain: libvirt.virDomain) -> str:
    """Return the path of the layer below a desktop's OS disk ("" for a full clone)."""
    root = ET.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    for disk in root.iter("disk"):
        target = disk.find("target")
        if target is None or target.get("dev") != "vda":
            continue
        source = disk.find("backingStore/source")
        return source.get("file", "") if source is not None else ""
    return ""
