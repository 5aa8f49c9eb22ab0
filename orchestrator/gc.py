"""labctl gc: find and remove what labctl can prove it left behind, and nothing else.

A proof is one of three things. The first is labctl's metadata in a domain, in the
desktop or parent namespace, with the inventory's name. The second is a name labctl
derives (volumes, state and RAM files, restore's FIFOs) that a journal operation of
the inventory recorded before it ran. The third is a replica's completion marker. A
domain without labctl metadata, or a volume that no journal operation named, is never
listed, whatever its name.

The leftovers are those of unfinished operations (see recovery.py), the artifacts
of finished operations whose domain is gone (e.g. undefined by hand), parent VMs that
are not usable and that no child uses, and replicas no disk uses.
"""

from __future__ import annotations

import logging

import libvirt

from orchestrator import journal, recovery
from orchestrator.hosts.context import HostContext
from orchestrator.instant import parent
from orchestrator.recovery import Hosts, Leftover, Sweep
from orchestrator.storage import replica

log = logging.getLogger(__name__)

# Operation kinds whose recorded artifacts belong to the operation's domain. A move
# names the desktop's disk in the storage pool it moved to.
DESKTOP_KINDS = ("provision", "parent-build", "move")


def find(inventory: str, hosts: Hosts,
         extra_hosts: list[tuple[str, str]] | None = None) -> Sweep:
    """Return the inventory's leftovers; the caller holds the inventory's run lock.

    ``extra_hosts`` are (URI, storage pool) pairs to search besides the ones the
    inventory's journal operations name (e.g. the hosts its file declares).
    """
    sweep = Sweep(hosts, protected=recovery.live_artifacts())
    recorded = journal.operations(inventory=inventory)
    unfinished = journal.unfinished(inventory)
    recovery.find_leftovers(sweep, unfinished)
    sweep.operations = unfinished
    open_ids = {operation.id for operation in unfinished}
    for operation in recorded:
        if operation.id not in open_ids and operation.state != journal.RUNNING:
            _finished_leftovers(sweep, operation)
    places = {(op.uri, op.storage_pool) for op in recorded} | set(extra_hosts or ())
    for uri, storage_pool in sorted(places):
        ctx = hosts.get(uri, storage_pool)
        _parent_leftovers(sweep, ctx, inventory)
        _replica_leftovers(sweep, ctx)
    _deduplicate(sweep)
    return sweep


def _finished_leftovers(sweep: Sweep, operation: journal.Operation) -> None:
    """Add a finished operation's volumes and files once its domain is gone."""
    if operation.kind not in DESKTOP_KINDS:
        return
    ctx = sweep.hosts.get(operation.uri, operation.storage_pool)
    if _exists(ctx, operation.artifacts.domain):
        return
    recovery.add_files_and_volumes(sweep, ctx, operation)


def _exists(ctx: HostContext, name: str) -> bool:
    try:
        ctx.conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def _parent_leftovers(sweep: Sweep, ctx: HostContext, inventory: str) -> None:
    """Parents of the inventory that children cannot use and no child needs."""
    if ctx._pool is None:
        return
    uri = ctx.settings.uri
    for domain, record in parent.inventory_parents(ctx.conn, inventory):
        name = domain.name()
        if (uri, name) in sweep.removed_domains or parent.usable(record):
            continue
        if parent.parent_users(ctx, record, name):
            continue
        sweep.removed_domains.add((uri, name))
        sweep.add(Leftover(0, "domain", name, uri, "remove",
                           f"parent VM {record.state} and unusable, no child uses it",
                           lambda d=domain: parent.remove_parent(ctx, d)))


def _replica_leftovers(sweep: Sweep, ctx: HostContext) -> None:
    pool = ctx._pool
    if pool is None:
        return
    for base in replica.unused(pool):
        sweep.add(Leftover(0, "replica", base, f"{ctx.settings.uri} {pool.name()}", "remove",
                           "no domain or volume uses it",
                           lambda b=base: replica.remove_unused(pool, only=b)))


def _deduplicate(sweep: Sweep) -> None:
    """Keep the first leftover of each (kind, name, host): finished operations of one
    desktop repeat the same volume names."""
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for leftover in sweep.leftovers:
        key = (leftover.kind, leftover.name, leftover.host)
        if key not in seen:
            seen.add(key)
            unique.append(leftover)
    sweep.leftovers = unique
