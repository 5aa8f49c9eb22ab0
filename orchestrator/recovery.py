"""Recovery of interrupted runs: the artifacts of unfinished journal operations.

A run killed midway leaves its journal operations "running" (see journal.py). For
each of them, newest first, this module finds what the operation left by the names it
recorded, and either adopts it or lists it as a leftover to remove:

- a domain is adopted when its labctl record is "ready" or "failed" (a failed
  desktop keeps its identity until the next apply re-creates it). It is removed when
  its record is "provisioning", or when it is a parent VM that is not usable and that
  no child uses.
  A domain without labctl metadata of the operation's inventory is never touched.
- a volume or file is removed unless its operation's domain was adopted or another
  domain or volume uses it.
- a refresh that removed the old domain and made no new one defines the old
  definition again, marked failed, so the desktop keeps its name, UUID and MAC.
- a disk move (rebalance) is rolled back to the old disk, or finished once the copy
  was started (see storage/move_recovery.py).
- a full clone's refresh from its snapshot that stopped before the desktop was ready
  powers it off and marks it failed, so the next apply re-creates it.

Other operation kinds register their own finder with ``register``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt

from orchestrator import journal
from orchestrator.errors import HostError, LabctlError
from orchestrator.hosts.context import HostContext, HostSettings, open_host
from orchestrator.instant import parent
from orchestrator.state import metadata
from orchestrator.storage import pool as volumes

log = logging.getLogger(__name__)

# Desktop record states a recovery keeps: the run that made the domain got that far.
KEPT_STATES = ("ready", "failed")


@dataclass
class Leftover:
    """One thing an interrupted run left, and what recovery does with it."""

    operation: int
    kind: str  # domain | volume | file | definition
    name: str
    host: str
    action: str  # e.g. "remove", "define as failed"
    reason: str
    perform: Callable[[], None] = field(repr=False, compare=False, default=lambda: None)


@dataclass
class Hosts:
    """Host contexts opened for recovery, one per libvirt URI and storage pool."""

    contexts: dict[tuple[str, str], HostContext] = field(default_factory=dict)

    def get(self, uri: str, storage_pool: str) -> HostContext:
        key = (uri, storage_pool)
        if key not in self.contexts:
            ctx = open_host(HostSettings(uri=uri, storage_pool=storage_pool), probe=False)
            # Only an existing pool: recovery must never define one at a default path.
            ctx._pool = _active_or_none(ctx.existing_pool(), uri)
            self.contexts[key] = ctx
        return self.contexts[key]

    def close(self) -> None:
        for ctx in self.contexts.values():
            ctx.close()


def _active_or_none(pool: libvirt.virStoragePool | None,
                    uri: str) -> libvirt.virStoragePool | None:
    """Return ``pool`` if it is active; an inactive one cannot list its volumes."""
    if pool is None:
        return None
    try:
        if pool.isActive():
            return pool
    except libvirt.libvirtError:
        return None
    log.warning("storage pool %s on %s is not active, so its volumes were not checked: "
                "start it (virsh pool-start %s) and run again", pool.name(), uri, pool.name())
    return None


@dataclass
class Sweep:
    """Decisions of one recovery so far, which later operations take into account."""

    hosts: Hosts
    # Artifact names a live labctl run may be creating: never leftovers.
    protected: set[str] = field(default_factory=set)
    # The unfinished operations whose leftovers these are, marked recovered at the end.
    operations: list[journal.Operation] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    removed_domains: set[tuple[str, str]] = field(default_factory=set)
    # Operations whose host could not be reached: they stay "running".
    unreachable: set[int] = field(default_factory=set)
    adopted_domains: set[tuple[str, str]] = field(default_factory=set)

    def add(self, leftover: Leftover) -> None:
        if leftover.name in self.protected or os.path.basename(leftover.name) in self.protected:
            log.info("%s %s: not a leftover, a running labctl may be making it",
                     leftover.kind, leftover.name)
            return
        self.leftovers.append(leftover)


Finder = Callable[[Sweep, HostContext, journal.Operation], None]
_FINDERS: dict[str, Finder] = {}


def register(kind: str, finder: Finder) -> None:
    """Let recovery handle journal operations of ``kind`` with ``finder``."""
    _FINDERS[kind] = finder


def find_leftovers(sweep: Sweep, operations: list[journal.Operation]) -> None:
    """Add the leftovers of ``operations`` (newest first, so inner operations come first)."""
    for operation in operations:
        try:
            ctx = sweep.hosts.get(operation.uri, operation.storage_pool)
        except HostError as exc:
            # The operation stays "running", so a later run tries again.
            log.warning("journal operation %d (%s of %s) not recovered: %s", operation.id,
                        operation.kind, operation.desktop, exc)
            sweep.unreachable.add(operation.id)
            continue
        _FINDERS.get(operation.kind, find_desktop_leftovers)(sweep, ctx, operation)


def recover(operations: list[journal.Operation], on_event, *, dry_run: bool = False,
            hosts: Hosts | None = None) -> list[Leftover]:
    """Find and (unless ``dry_run``) remove the leftovers of unfinished ``operations``."""
    own_hosts = hosts is None
    sweep = Sweep(hosts or Hosts(), protected=live_artifacts(), operations=operations)
    try:
        find_leftovers(sweep, operations)
        if not dry_run:
            for error in perform(sweep, on_event):
                log.error("%s", error)
    finally:
        if own_hosts:
            sweep.hosts.close()
    return sweep.leftovers


def perform(sweep: Sweep, on_event) -> list[str]:
    """Handle every leftover of ``sweep``; return the errors (the others are done).

    Each of the sweep's operations whose leftovers were all handled is marked
    "recovered"; one with a failed removal stays "running" for the next run.
    """
    failed: set[int] = set()
    errors = []
    for leftover in sweep.leftovers:
        try:
            leftover.perform()
        except (libvirt.libvirtError, OSError, LabctlError) as exc:
            errors.append(f"{leftover.action} {leftover.kind} {leftover.name} failed: {exc}")
            failed.add(leftover.operation)
            continue
        on_event(leftover.name, "recover", f"{leftover.action} {leftover.kind}: "
                 f"{leftover.reason}")
    for operation in sweep.operations:
        if operation.id not in failed and operation.id not in sweep.unreachable:
            journal.finish(operation, journal.RECOVERED)
    return errors


def live_artifacts() -> set[str]:
    """Return the names that a live labctl run (of any inventory) may be creating now."""
    names: set[str] = set()
    for operation in journal.operations(state=journal.RUNNING):
        if journal.alive(operation.pid) and operation.pid != os.getpid():
            artifacts = operation.artifacts
            names |= {artifacts.domain, *artifacts.volumes, *artifacts.files}
    names.discard("")
    return names


def recover_inventory(inventory: str, on_event, *, dry_run: bool = False,
                      hosts: Hosts | None = None) -> list[Leftover]:
    """Recover the inventory's unfinished operations; the caller holds its run lock.

    Old finished operations that gc no longer needs are pruned first (journal.prune).
    """
    if not dry_run:
        journal.prune(inventory)
    operations = journal.unfinished(inventory)
    if not operations:
        return []
    log.info("inventory %s: %d interrupted operations to recover", inventory, len(operations))
    return recover(operations, on_event, dry_run=dry_run, hosts=hosts)


# -- desktops and parents ------------------------------------------------------------


def find_desktop_leftovers(sweep: Sweep, ctx: HostContext, operation: journal.Operation) -> None:
    """Leftovers of a desktop's provisioning (and the default for unknown kinds)."""
    name = operation.artifacts.domain
    domain = lookup_domain(ctx, name)
    record = metadata.read(domain) if domain is not None else None
    if record is not None and record.inventory == operation.inventory:
        if record.state in KEPT_STATES:
            sweep.adopted_domains.add((ctx.settings.uri, name))
            log.info("%s: adopted, its record state is %s", name, record.state)
            return
        _add_domain(sweep, ctx, operation, domain, f"left {record.state} by an interrupted run")
    add_files_and_volumes(sweep, ctx, operation)


def find_parent_leftovers(sweep: Sweep, ctx: HostContext, operation: journal.Operation) -> None:
    """Leftovers of a parent VM's build: all of it, unless the parent is usable or used."""
    name = operation.artifacts.domain
    domain = lookup_domain(ctx, name)
    record = parent.read_record(domain) if domain is not None else None
    if record is not None and record.inventory == operation.inventory:
        if parent.usable(record):
            sweep.adopted_domains.add((ctx.settings.uri, name))
            return
        users = parent.parent_users(ctx, record, name) if ctx._pool is not None else []
        if users:
            log.warning("%s: interrupted build kept, its disk backs %s", name, ", ".join(users))
            sweep.adopted_domains.add((ctx.settings.uri, name))
            return
        _add_domain(sweep, ctx, operation, domain, f"parent VM left {record.state} by an "
                    "interrupted build")
    add_files_and_volumes(sweep, ctx, operation)


def find_refresh_leftovers(sweep: Sweep, ctx: HostContext, operation: journal.Operation) -> None:
    """Define the old domain of an interrupted refresh again if no domain has its name.

    The refresh's provisioning is a newer operation, already handled, so a domain that is left
    is either the old one (not removed yet) or the new one (ready).
    """
    from orchestrator.apply import define_failed  # apply imports recovery's users

    name = operation.artifacts.domain
    uri = ctx.settings.uri
    exists = lookup_domain(ctx, name) is not None and (uri, name) not in sweep.removed_domains
    definition = operation.data.get("definition", "")
    if exists or not definition:
        return
    sweep.add(Leftover(operation.id, "definition", name, uri, "define as failed",
                       "the refresh removed the old domain and made no new one",
                       lambda: define_failed(ctx, definition)))


def find_move_leftovers(sweep: Sweep, ctx: HostContext, operation: journal.Operation) -> None:
    """Finish or roll back an interrupted disk move (see storage/move_recovery.py)."""
    from orchestrator.storage import move_recovery  # it imports this module

    move_recovery.find_move_leftovers(sweep, ctx, operation)


def find_snapshot_refresh_leftovers(sweep: Sweep, ctx: HostContext,
                                    operation: journal.Operation) -> None:
    """Mark a full clone failed if a refresh from its snapshot stopped before it was ready.

    Its disk may be reverted or not and its domain may be off, so the next apply
    re-creates it with a new copy of the image. The domain keeps its name, UUID and MAC.
    """
    name = operation.artifacts.domain
    domain = lookup_domain(ctx, name)
    record = metadata.read(domain) if domain is not None else None
    if record is None or record.inventory != operation.inventory or record.state == "ready":
        return
    sweep.add(Leftover(operation.id, "domain", name, ctx.settings.uri, "mark failed",
                       f"a refresh from its snapshot stopped with the desktop {record.state}",
                       lambda: _mark_failed(domain)))


def _mark_failed(domain: libvirt.virDomain) -> None:
    """Power a desktop off and record it failed, so the next apply re-creates it."""
    with contextlib.suppress(libvirt.libvirtError):
        if domain.isActive():
            domain.destroy()
    record = metadata.read(domain)
    if record is not None:
        record.state = "failed"
        metadata.write(domain, record)


register("parent-build", find_parent_leftovers)
register("refresh", find_refresh_leftovers)
register("move", find_move_leftovers)
register("snapshot-refresh", find_snapshot_refresh_leftovers)


def lookup_domain(ctx: HostContext, name: str) -> libvirt.virDomain | None:
    """Return the domain ``name`` of the host, or None if there is none."""
    if not name:
        return None
    try:
        return ctx.conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _add_domain(sweep: Sweep, ctx: HostContext, operation: journal.Operation,
                domain: libvirt.virDomain, reason: str) -> None:
    sweep.removed_domains.add((ctx.settings.uri, domain.name()))
    sweep.add(Leftover(operation.id, "domain", domain.name(), ctx.settings.uri, "remove",
                       reason, lambda: remove_domain(domain)))


def remove_domain(domain: libvirt.virDomain) -> None:
    """Destroy and undefine a domain (transient ones vanish with the destroy)."""
    with contextlib.suppress(libvirt.libvirtError):
        if domain.isActive():
            domain.destroy()
    try:
        persistent = domain.isPersistent()
    except libvirt.libvirtError:
        return  # a transient domain, gone with its destroy
    if persistent:
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                             | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)


def add_files_and_volumes(sweep: Sweep, ctx: HostContext,
                          operation: journal.Operation) -> None:
    artifacts = operation.artifacts
    uri = ctx.settings.uri
    used = referenced_paths(ctx, excluding={n for u, n in sweep.removed_domains if u == uri})
    pool = ctx._pool
    if pool is not None:
        directory = volumes.pool_path(pool)
        for name in artifacts.volumes:
            path = os.path.join(directory, name)
            if not _volume_exists(pool, name, path) or path in used:
                continue
            sweep.add(Leftover(operation.id, "volume", name, f"{uri} {pool.name()}", "remove",
                               f"made by an interrupted {operation.kind} of "
                               f"{operation.desktop}", _volume_remover(pool, name)))
    files = [path for path in artifacts.files if os.path.lexists(path)]
    for pattern in artifacts.file_patterns:
        files += [path for path in glob.glob(pattern)
                  if fnmatch.fnmatchcase(path, pattern)]
    for path in files:
        if path in used:
            continue
        sweep.add(Leftover(operation.id, "file", path, "localhost", "remove",
                           f"made by an interrupted {operation.kind} of {operation.desktop}",
                           _file_remover(path)))


def _volume_exists(pool: libvirt.virStoragePool, name: str, path: str) -> bool:
    # libvirt lists only the volumes made through its API or seen by a refresh. State
    # files are written by libvirt's save and by QEMU, so the directory is checked too.
    return volumes.find_volume(pool, name) is not None or os.path.lexists(path)


def _volume_remover(pool: libvirt.virStoragePool, name: str) -> Callable[[], None]:
    def remove() -> None:
        if not volumes.delete(pool, name):
            path = os.path.join(volumes.pool_path(pool), name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return remove


def _file_remover(path: str) -> Callable[[], None]:
    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return remove


def referenced_paths(ctx: HostContext, *, excluding: set[str]) -> set[str]:
    """Return the files that domains (except ``excluding``) and volumes of the pool use.

    A parent's record names its state and RAM files, which no domain XML contains.
    """
    used: set[str] = set()
    for domain in ctx.conn.listAllDomains(0):
        try:
            name = domain.name()
            if name in excluding:
                continue
            root = ET.fromstring(domain.XMLDesc(0))
        except libvirt.libvirtError:
            continue  # removed since the listing
        used |= {source.get("file") or "" for source in root.iter("source")}
        used |= {root.findtext("os/kernel") or "", root.findtext("os/initrd") or ""}
        record = parent.read_record(domain) if name.startswith(parent.PREFIX) else None
        if record is not None:
            used |= {record.state_file, record.ram_file}
    if ctx._pool is not None:
        used |= _backing_paths(ctx._pool)
    used.discard("")
    return used


def _backing_paths(pool: libvirt.virStoragePool) -> set[str]:
    found = set()
    for volume in pool.listAllVolumes(0):
        try:
            backing = ET.fromstring(volume.XMLDesc(0)).findtext("backingStore/path")
        except libvirt.libvirtError:
            continue  # deleted by another run after the listing
        if backing:
            found.add(backing)
    return found
