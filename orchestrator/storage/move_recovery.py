"""Recovery of a disk move (orchestrator/storage/move.py) that a killed run left running.

The desktop is never lost. A move killed before its ``start`` step was done is rolled
back: the old definition is defined again, the copy and a replica the move uploaded
are deleted, and the desktop is started again if it ran. The old disk stays until the
copy has been verified, defined and started. So a move killed after ``start`` is
finished: the record names the copy, and the old disk is deleted.

Either way the desktop keeps one definition, on one disk, with its name, UUID and MAC.
A domain without labctl metadata of the operation's inventory is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import xml.etree.ElementTree as ET

import libvirt

from orchestrator import journal
from orchestrator.hosts.context import HostContext
from orchestrator.recovery import Leftover, Sweep, lookup_domain, referenced_paths
from orchestrator.state import metadata
from orchestrator.storage import pool as volumes
from orchestrator.storage import replica

log = logging.getLogger(__name__)

# The step after which a move is finished rather than rolled back.
POINT_OF_NO_RETURN = "start"


def find_move_leftovers(sweep: Sweep, ctx: HostContext, operation: journal.Operation) -> None:
    """Add the roll-back or the completion of an interrupted move as one leftover."""
    name = operation.desktop
    domain = lookup_domain(ctx, name)
    record = metadata.read(domain) if domain is not None else None
    if domain is not None and (record is None or record.inventory != operation.inventory):
        log.warning("%s: not recovering its move, the domain is not labctl's desktop of "
                    "inventory %s", name, operation.inventory)
        return
    if operation.step_state(POINT_OF_NO_RETURN) == "done":
        action, reason = "finish", "the copy was started; the old disk is deleted"
        work = lambda: finish_move(ctx, operation)  # noqa: E731
    else:
        action, reason = "roll back", "killed before the copy was started"
        work = lambda: roll_back_move(ctx, operation)  # noqa: E731
    sweep.add(Leftover(operation.id, "move", name, ctx.settings.uri, action,
                       f"{reason} (storage pool {operation.storage_pool})", work))


def roll_back_move(ctx: HostContext, operation: journal.Operation) -> None:
    """Put the desktop back on its old disk and delete the copy (and a replica made)."""
    data = operation.data
    domain = lookup_domain(ctx, operation.desktop)
    if domain is not None:
        if _uses(domain, data["new_disk"]):
            _stop(domain)
            domain = ctx.conn.defineXML(data["definition"])
            log.info("%s: defined again on its old disk %s", operation.desktop,
                     data["old_disk"])
        _start_if_it_ran(domain, data)
    _delete_unused(ctx, data["new_disk"])
    if data.get("replica"):
        _remove_replica(ctx, operation.storage_pool, data["replica"])


def finish_move(ctx: HostContext, operation: journal.Operation) -> None:
    """Make the record name the copy the domain uses, then delete the old disk."""
    data = operation.data
    domain = lookup_domain(ctx, operation.desktop)
    if domain is not None:
        record = metadata.read(domain)
        if record is not None and record.disk != data["new_disk"]:
            record.disk = data["new_disk"]
            metadata.write(domain, record)
        _start_if_it_ran(domain, data)
    _delete_unused(ctx, data["old_disk"])


def _uses(domain: libvirt.virDomain, path: str) -> bool:
    """Return whether the running or the persistent definition has a disk at ``path``."""
    flags = [0]
    if domain.isPersistent():
        flags.append(libvirt.VIR_DOMAIN_XML_INACTIVE)
    for flag in flags:
        root = ET.fromstring(domain.XMLDesc(flag))
        if any(source.get("file") == path for source in root.iter("source")):
            return True
    return False


def _stop(domain: libvirt.virDomain) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        if domain.isActive():
            domain.destroy()


def _start_if_it_ran(domain: libvirt.virDomain, data: dict) -> None:
    """Start the desktop again if it ran before the move; the caller's apply checks it."""
    if data.get("was_running") and not domain.isActive():
        domain.create()
        log.info("%s: started again after its interrupted move", domain.name())


def _delete_unused(ctx: HostContext, path: str) -> None:
    """Delete the volume at ``path`` unless a domain or volume uses it."""
    if path in referenced_paths(ctx, excluding=set()):
        log.warning("%s: kept, a domain or volume uses it", path)
        return
    try:
        volume = ctx.conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        # libvirt lists a volume only after a refresh of its pool.
        if os.path.lexists(path):
            os.unlink(path)
        return
    volumes.delete(volume.storagePoolLookupByVolume(), volume.name())


def _remove_replica(ctx: HostContext, storage_pool: str, base: str) -> None:
    # NOTE: a replica whose upload was killed has no completion marker, so remove_unused
    # skips it. The next upload into that storage pool replaces it.
    try:
        pool = ctx.conn.storagePoolLookupByName(storage_pool)
    except libvirt.libvirtError:
        return  # the storage pool is gone, and the replica with it
    for name in replica.remove_unused(pool, only=base):
        log.info("%s: removed from storage pool %s, a rolled back move uploaded it", name,
                 storage_pool)
