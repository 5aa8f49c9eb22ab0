"""Removing desktops: only domains carrying labctl metadata, and only their own volumes."""

from __future__ import annotations

import contextlib
import logging
import os

import libvirt

from orchestrator import journal, paths
from orchestrator.errors import ConflictError, LabctlError
from orchestrator.hosts.context import HostContext
from orchestrator.provision.desktop import os_volume_name, seed_volume_name
from orchestrator.provision.steps import EventSink, Step, run_steps
from orchestrator.state import metadata
from orchestrator.storage import pool as volumes
from orchestrator.instant import parent
from orchestrator.storage import replica

log = logging.getLogger(__name__)


def remove_desktop(ctx: HostContext, domain: libvirt.virDomain, inventory: str,
                   on_event: EventSink) -> None:
    """Destroy and undefine ``domain`` and delete its OS disk and seed.

    Refuses a domain without labctl metadata or belonging to another inventory, and
    deletes a volume only if its path is the one recorded in the metadata and its name
    is labctl's name for that desktop.
    """
    name = domain.name()
    record = metadata.read(domain)
    if record is None or record.inventory != inventory:
        owner = "no labctl metadata" if record is None else f"inventory {record.inventory}"
        raise ConflictError(f"domain {name} is not part of inventory {inventory} ({owner})",
                            where=ctx.settings.uri, fix="labctl removes only what it created")
    on_event(name, "remove", "start")
    operation = journal.begin(
        "remove", inventory=inventory, desktop=name, host=record.host, uri=ctx.settings.uri,
        storage_pool=_storage_pool_of(ctx, record.disk),
        artifacts=journal.Artifacts(domain=name,
                                    volumes=(os_volume_name(name), seed_volume_name(name))))
    steps = [
        Step("undefine", lambda: _undefine(domain)),
        Step("volumes", lambda: _delete_volumes(ctx, name, record)),
    ]
    run_steps(name, steps, on_event, operation)
    on_event(name, "remove", "done")


def _undefine(domain: libvirt.virDomain) -> None:
    # An instant clone is transient until its persist step, so a run killed before that
    # step leaves a domain that vanishes when it is destroyed and has nothing to undefine.
    persistent = domain.isPersistent()
    if domain.isActive():
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()
    if persistent:
        with contextlib.suppress(libvirt.libvirtError):
            domain.managedSaveRemove(0)
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                             | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)


def _delete_volumes(ctx: HostContext, name: str, record: metadata.DesktopRecord) -> None:
    for volume_name, recorded in ((os_volume_name(name), record.disk),
                                  (seed_volume_name(name), record.seed)):
        _delete_own_volume(ctx.conn, volume_name, recorded)
    # The known_hosts file `labctl ssh` wrote for this desktop.
    (paths.state_dir() / "known_hosts" / f"{name}.known").unlink(missing_ok=True)


def _storage_pool_of(ctx: HostContext, path: str) -> str:
    """Return the storage pool of the volume at ``path``: the inventory may name another
    pool now than when the desktop was made."""
    try:
        return ctx.conn.storageVolLookupByPath(path).storagePoolLookupByVolume().name()
    except libvirt.libvirtError:
        return ctx.settings.storage_pool


def _delete_own_volume(conn: libvirt.virConnect, volume_name: str, recorded_path: str) -> None:
    """Delete the volume at ``recorded_path`` if it still exists and carries labctl's name.

    The volume is looked up by its path, so it is found in whichever storage pool it was
    made, even if the inventory now names another pool.
    """
    if not recorded_path:
        return
    if os.path.basename(recorded_path) != volume_name:
        log.warning("not deleting %s: its name is not labctl's %s", recorded_path, volume_name)
        return
    try:
        volume = conn.storageVolLookupByPath(recorded_path)
    except libvirt.libvirtError:
        return  # already gone
    volumes.delete(volume.storagePoolLookupByVolume(), volume_name)


def destroy_inventory(ctx: HostContext, inventory: str, on_event: EventSink) -> list[LabctlError]:
    """Remove every desktop of ``inventory`` on the host, then the replicas left unused.

    Returns the errors of the desktops that could not be removed; the others are gone.
    """
    errors: list[LabctlError] = []
    desktops = metadata.inventory_desktops(ctx.conn, inventory)
    for _name, (domain, _record) in sorted(desktops.items()):
        try:
            remove_desktop(ctx, domain, inventory, on_event)
        except LabctlError as exc:
            errors.append(exc)
    remove_unused_bases(ctx, inventory, set(), on_event)
    return errors


def remove_unused_bases(ctx: HostContext, inventory: str, keep: set[str],
                        on_event: EventSink) -> None:
    """Remove the inventory's parent VMs that no child uses (except usable ones in ``keep``)
    and the replicas no domain or volume uses, in every storage pool of the host."""
    with ctx.maintenance:
        parent.remove_unused_parents(ctx, inventory, keep, on_event)
        for pool in ctx.existing_pools():
            for volume in replica.remove_unused(pool):
                on_event(volume, "remove", "unused replica removed")
