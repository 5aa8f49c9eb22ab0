"""rebalance: spread a pool's desktops evenly over the storage pools its ``storage:`` lists.

Each listed storage pool gets its share (the first ones one more when the desktops do
not divide evenly, preferring the storage pools that already hold more, so that fewer
desktops move). Desktops in a storage pool that is not listed any more all move. A
desktop in use or suspended (managed save) is skipped with a message; the next
rebalance moves it. Each move is one transaction (orchestrator.storage.move) under the
host's maintenance throttle. A failed move leaves the desktop on its old disk, and the
other moves go on. A move killed midway is a journal operation that the next ``labctl
rebalance`` or ``labctl apply`` finishes or rolls back before it plans anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import libvirt

from orchestrator.errors import HostError, LabctlError
from orchestrator.hosts.connection import is_local
from orchestrator.hosts.context import HostContext
from orchestrator.identity import keys
from orchestrator.instant import parent
from orchestrator.plan import READY_TIMEOUT, Plan
from orchestrator.provision.remove import remove_unused_bases
from orchestrator.provision.steps import EventSink
from orchestrator.recompose import check_pools
from orchestrator.state import events
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage.move import DiskMove
from orchestrator.storage.placement import storage_of

log = logging.getLogger(__name__)


@dataclass
class RebalanceResult:
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)  # desktop: (from, to)
    skipped: dict[str, str] = field(default_factory=dict)  # desktop: why
    failed: dict[str, LabctlError] = field(default_factory=dict)
    # pool: {storage pool: desktops} after the run
    spread: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Move:
    desktop: str
    source: str
    target: str


def plan_moves(current: dict[str, str], storage: list[str],
               pinned: set[str] | None = None) -> list[Move]:
    """Return the moves that spread ``current`` (desktop: storage pool) over ``storage``.

    Desktops in ``pinned`` (in use, suspended) stay where they are and count there.
    """
    pinned = pinned or set()
    counts = {name: sum(1 for where in current.values() if where == name) for name in storage}
    # Pinned desktops outside the listed pools stay there and take no share.
    placed = sum(1 for desktop, where in current.items()
                 if where in counts or desktop not in pinned)
    quota = _quotas(placed, storage, counts)
    surplus: list[tuple[str, str]] = []
    for desktop, where in sorted(current.items(), key=lambda item: item[0]):
        if where not in quota:
            surplus.append((desktop, where))
    for name in storage:
        movable = sorted((d for d, w in current.items() if w == name and d not in pinned),
                         reverse=True)
        surplus += [(desktop, name) for desktop in movable[:max(0, counts[name] - quota[name])]]
    moves = []
    for desktop, source in surplus:
        if desktop in pinned:
            continue
        target = min(storage, key=lambda name: (counts[name] - quota[name], counts[name]))
        if counts[target] >= quota[target]:
            break
        counts[target] += 1
        if source in counts:
            counts[source] -= 1
        moves.append(Move(desktop, source, target))
    return moves


def _quotas(total: int, storage: list[str], counts: dict[str, int]) -> dict[str, int]:
    base, extra = divmod(total, len(storage))
    fuller = sorted(storage, key=lambda name: -counts[name])  # stable: list order on a tie
    return {name: base + (1 if name in fuller[:extra] else 0) for name in storage}


def rebalance(plan: Plan, pools: list[str], on_event: EventSink) -> RebalanceResult:
    """Spread the desktops of ``pools`` over their storage pools; return what moved."""
    result = RebalanceResult()
    # An inventory without desktops may have no key yet; one with desktops must have it.
    has_desktops = any(action.record is not None for action in plan.actions)
    access_key = keys.access_key(plan.inventory.name, create=not has_desktops)
    for pool_key in check_pools(plan, pools):
        _rebalance_pool(plan, pool_key, access_key.private, on_event, result)
    for ctx in plan.hosts.values():
        remove_unused_bases(ctx, plan.inventory.name, _all_parent_keys(plan, ctx), on_event)
    return result


def _all_parent_keys(plan: Plan, ctx: HostContext) -> set[str]:
    """Rebalance never retires parents: keep every one the inventory has."""
    return {record.key for _d, record in parent.inventory_parents(ctx.conn, plan.inventory.name)}


def _rebalance_pool(plan: Plan, pool_key: str, access_key: str, on_event: EventSink,
                    result: RebalanceResult) -> None:
    pool = plan.inventory.pools[pool_key]
    ctx = plan.hosts[pool.host]
    if pool.clone == "instant":
        on_event(pool_key, "rebalance", "skipped: instant clones stay on their parent's "
                 "storage pool")
        return
    if not is_local(ctx.settings.uri):
        raise HostError(
            f"rebalance copies and checks disks with the local qemu-img, but pool {pool_key} "
            f"is on {ctx.settings.uri}", where=plan.inventory.where(("pools", pool_key, "host")),
            fix="run labctl rebalance on that host",
        )
    storage = pool.storage or [ctx.settings.storage_pool]
    desktops = _desktops(plan, pool_key)
    paths = ctx.storage_paths()
    current = {name: storage_of(record.disk, paths) or record.disk
               for name, (_domain, record) in desktops.items()}
    pinned = _pinned(desktops, result)
    for move in plan_moves(current, storage, pinned):
        domain, record = desktops[move.desktop]
        _move(plan, ctx, move, domain, record, access_key, on_event, result)
        if move.desktop in result.moved:
            current[move.desktop] = move.target
    result.spread[pool_key] = {name: sum(1 for w in current.values() if w == name)
                               for name in storage}


def _desktops(plan: Plan, pool_key: str) -> dict[str, tuple[libvirt.virDomain, DesktopRecord]]:
    found = {}
    for action in plan.actions:
        if action.pool != pool_key or action.record is None:
            continue
        ctx = plan.hosts[action.host]
        try:
            found[action.desktop] = (ctx.conn.lookupByName(action.desktop), action.record)
        except libvirt.libvirtError:
            continue
    return found


def _pinned(desktops: dict, result: RebalanceResult) -> set[str]:
    """Desktops that may not move now, with the reason noted in ``result.skipped``."""
    pinned = set()
    for name, (domain, record) in desktops.items():
        if record.session_user:
            result.skipped[name] = (f"in use by {record.session_user}; the next rebalance "
                                    "after its release moves it")
        elif domain.hasManagedSaveImage(0):
            result.skipped[name] = ("suspended (managed save) with its disk path in the "
                                    "saved state; start or shut it down, then rebalance")
        else:
            continue
        pinned.add(name)
    return pinned


def _move(plan: Plan, ctx: HostContext, move: Move, domain: libvirt.virDomain, record: DesktopRecord,
          access_key: str, on_event: EventSink, result: RebalanceResult) -> None:
    inventory = plan.inventory.name
    message = f"storage pool {move.source} -> {move.target}"
    log.info("pool %s desktop %s: rebalance: %s", record.pool, move.desktop, message)
    events.record(inventory, "rebalance", message, pool=record.pool, desktop=move.desktop)
    job = DiskMove(ctx, domain, record, move.target, access_key, on_event,
                   ready_timeout=READY_TIMEOUT[ctx.accelerator])
    try:
        with ctx.maintenance:
            path = job.run()
    except LabctlError as exc:
        result.failed[move.desktop] = exc
        events.record(inventory, "rebalance-failed", str(exc), pool=record.pool,
                      desktop=move.desktop)
        return
    result.moved[move.desktop] = (move.source, move.target)
    events.record(inventory, "rebalance", f"done: {path}", pool=record.pool,
                  desktop=move.desktop)
