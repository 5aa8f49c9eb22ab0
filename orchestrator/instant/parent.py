"""Parent VMs of instant clones: booted once, prepared, paused, saved, then frozen.

One parent exists per instant pool and configuration (image version, method,
hardware, users): its key hashes them, so a new image version gets a new parent and
the old one goes once no child uses its disk. A parent has no NIC, so no child ever
shows the parent's MAC. After the save it stays defined (shut off) only to carry its
record. Its disk is made read-only, because every child's overlay is backed by it.

Artifacts are named after the key and a build number (1, 2, ...). So an interrupted
build can be found and removed. They are: domain ``labctl-parent-KEY-N``, volumes
``labctl-parent-KEY-N-os.qcow2`` and ``-seed.iso``, the state file
``labctl-parent-KEY-N.save`` (restore: a libvirt save image) or ``.state`` (fork:
device state only) in the storage pool, and for fork the RAM file
``fork.ram_path(KEY-N)``. A parent whose state or RAM file is lost while children still
use its disk is kept (their disks need it), and the next child gets a new build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import libvirt

from orchestrator import journal, locks
from orchestrator.domain import DiskLayer, render_domain
from orchestrator.errors import GuestError
from orchestrator.guest import agent
from orchestrator.hosts.context import HostContext
from orchestrator.identity import keys
from orchestrator.instant import cloneprep, fork
from orchestrator.provision import readiness
from orchestrator.provision.desktop import Provisioning
from orchestrator.provision.request import DesktopRequest, NetworkSpec
from orchestrator.provision.steps import EventSink, Step, run_steps
from orchestrator.state import metadata
from orchestrator.state.metadata import PARENT_NAMESPACE, DesktopRecord
from orchestrator.storage import pool as volumes
from orchestrator.storage.replica import replica_users

log = logging.getLogger(__name__)

PREFIX = "labctl-parent-"

# Fills all but 48 MiB of the guest's free memory with a zeroed string and exits, which
# puts those pages back on the free list as zeros. Needs perl (Debian's perl-base is
# essential); guests without it are saved as they are.
_ZERO_FREE_MEMORY = """command -v perl >/dev/null || exit 0
exec perl -e 'open(my $m, "<", "/proc/meminfo") or exit 0;
  my ($free) = map { /^MemFree:\\s+(\\d+) kB/ ? $1 : () } <$m>;
  my $keep = 48 * 1024;
  my $zeros = "\\0" x (($free // 0) > $keep ? ($free - $keep) * 1024 : 0);'
"""


@dataclass
class ParentRecord:
    """Facts about one parent VM, stored in its domain under PARENT_NAMESPACE."""

    key: str
    inventory: str
    pool: str
    image: str
    method: str
    host: str
    state: str = "building"
    disk: str = ""
    seed: str = ""
    state_file: str = ""
    ram_file: str = ""
    state_bytes: int = 0
    memory_bytes: int = 0
    instance_id: str = ""
    created: str = ""
    build_seconds: float = 0.0


def parent_key(request: DesktopRequest, method: str, domain_type: str) -> str:
    """Hash of what a parent's memory depends on: children of one key are interchangeable."""
    data = {
        "inventory": request.inventory, "pool": request.pool, "image": request.image.ref,
        "method": method, "vcpus": request.vcpus, "memory": request.memory_bytes,
        "disk": request.disk_size, "users": [dataclasses.asdict(u) for u in request.users],
        "timezone": request.timezone, "domain": request.domain, "type": domain_type,
        "share_memory": request.share_memory,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def parent_name(key: str, build: int) -> str:
    return f"{PREFIX}{key}-{build}"


def state_file_name(name: str, method: str) -> str:
    return f"{name}.{'state' if method == 'fork' else 'save'}"


def parent_volume_names(name: str) -> tuple[str, str, str, str]:
    """Return the parent's volume names: OS disk, seed, and the two possible state files."""
    return (f"{name}-os.qcow2", f"{name}-seed.iso", state_file_name(name, "fork"),
            state_file_name(name, "restore"))


def read_record(domain: libvirt.virDomain) -> ParentRecord | None:
    return metadata.read(domain, ParentRecord, PARENT_NAMESPACE)


def parent_request(request: DesktopRequest, name: str) -> DesktopRequest:
    """Derive the parent's request from a child's: same image, hardware and users, no NIC."""
    return dataclasses.replace(
        request, name=name, index=0, hostname=name,
        network=NetworkSpec(name="", mode="none"), run_once=(), tcg_cache_mib=0,
    )


@dataclass
class ParentBuild(Provisioning):
    """Provisioning of a parent: a desktop without NIC, then prepared, saved and frozen."""

    key: str = ""
    method: str = "restore"
    parent: ParentRecord | None = None

    operation_kind = "parent-build"
    started: float = 0.0

    def steps(self) -> list[Step]:
        """Return a desktop's steps up to ready, then prepare, save, freeze and record."""
        desktop = [step for step in super().steps() if step.name != "record"]
        return desktop + [
            Step("prepare", self.prepare),
            Step("save", self.save, self.remove_state),
            Step("freeze", self.freeze),
            Step("record", self.record_parent),
        ]

    def artifacts(self) -> journal.Artifacts:
        return journal.Artifacts(domain=self.request.name,
                                 volumes=parent_volume_names(self.request.name),
                                 files=(self.ram_file,) if self.method == "fork" else ())

    def run_parent(self) -> ParentRecord:
        self.started = time.monotonic()
        run_steps(self.request.name, self.steps(), self.on_event, self.begin_operation())
        assert self.parent is not None
        return self.parent

    def record_parent(self) -> None:
        """Mark the parent ready in its domain's record: children may now use it."""
        assert self.parent is not None and self.domain is not None
        self.parent.build_seconds = round(time.monotonic() - self.started, 1)
        self.parent.state = "ready"
        metadata.write(self.domain, self.parent, PARENT_NAMESPACE)

    def backing_layers(self) -> tuple[DiskLayer, ...]:
        """Return the replica: the parent's disk is an overlay on it, like a linked clone's."""
        assert self.replica is not None
        return (self.replica.disk,)

    def os_volume(self) -> str:
        return parent_volume_names(self.request.name)[0]

    def seed_volume(self) -> str:
        return parent_volume_names(self.request.name)[1]

    @property
    def ram_file(self) -> str:
        return fork.ram_path(self.request.name.removeprefix(PREFIX))

    def check_name(self) -> None:
        """Also remove the state and RAM files an interrupted build of this name left."""
        super().check_name()
        for volume in parent_volume_names(self.request.name)[2:]:
            volumes.delete(self.ctx.pool, volume)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ram_file)

    def define(self) -> None:
        if self.method == "fork":
            fork.prepare_ram_dir()
            fork.create_ram_file(self.ram_file)
        super().define()

    def define_args(self) -> tuple[str, ...]:
        if self.method != "fork":
            return ()
        return tuple(fork.parent_args(self.ram_file, self.request.memory_bytes))

    def stop(self) -> None:
        super().stop()
        if self.method == "fork":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ram_file)

    def metadata_xml(self, record: DesktopRecord) -> str:
        assert self.identity is not None
        if self.parent is not None:
            return metadata.to_xml(self.parent, PARENT_NAMESPACE)
        self.parent = ParentRecord(
            key=self.key, inventory=self.request.inventory, pool=self.request.pool,
            image=self.request.image.ref, method=self.method, host=self.request.host,
            disk=self.os_disk, seed=self.seed, memory_bytes=self.request.memory_bytes,
            instance_id=self.identity.instance_id,
            # Recorded before the start, so a killed build's RAM file is found and removed.
            ram_file=self.ram_file if self.method == "fork" else "",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return metadata.to_xml(self.parent, PARENT_NAMESPACE)

    def wait_ready(self) -> None:
        """Wait for the agent, the parent's identity and cloud-init (no NIC, so no SSH)."""
        assert self.domain is not None and self.identity is not None
        expected = readiness.Expected(
            hostname=self.identity.hostname, machine_id=self.identity.machine_id,
            ssh_address="", ssh_port=0, login_user="", host_key="",
            cloud_init=self.request.image.identity == "cloud-init",
        )
        readiness.wait_ready(self.domain, expected, "", timeout=self.request.ready_timeout)

    def prepare(self) -> None:
        """Write everything to disk and drop clean caches: less state to save and restore.

        The parent's SSH host keys go first, so no child can ever serve them; ClonePrep
        writes each child's own. For restore, the guest's free memory is also zeroed: a
        save image carries each zero page as a flag, and every child restores (and holds)
        the whole image.
        """
        assert self.domain is not None
        if cloneprep.profile_for(self.request.image.identity) == "systemd":
            agent.check_output(self.domain, ["find", "/etc/ssh", "-maxdepth", "1", "-name",
                                             "ssh_host_*", "-delete"])
        agent.check_output(self.domain, ["sync"])
        agent.write_file(self.domain, "/proc/sys/vm/drop_caches", b"3\n", mode=None)
        if self.method == "restore":
            agent.check_output(self.domain, ["/bin/sh", "-c", _ZERO_FREE_MEMORY],
                               timeout=self.request.ready_timeout)

    def save(self) -> None:
        assert self.domain is not None and self.parent is not None
        started = time.monotonic()
        path = os.path.join(volumes.pool_path(self.ctx.pool),
                            state_file_name(self.request.name, self.method))
        self.parent.state_file = path
        if self.method == "fork":
            self.domain.suspend()
            self.parent.state_bytes = fork.save_device_state(
                self.domain, path, timeout=self.request.ready_timeout)
            self.parent.ram_file = self.ram_file
            self.domain.destroy()
        else:
            try:
                self.domain.save(path)
            except libvirt.libvirtError as exc:
                raise GuestError(f"saving the parent failed: {exc.get_error_message()}",
                                 where=self.request.name,
                                 fix="check free space in the storage pool") from exc
            self.parent.state_bytes = os.path.getsize(path)
        self.timings["save"] = time.monotonic() - started

    def remove_state(self) -> None:
        assert self.parent is not None
        remove_files(self.parent)

    def freeze(self) -> None:
        """Make the parent's disk read-only and its definition unable to touch shared state.

        Children's overlays are backed by the parent's disk and fork children map its RAM
        file: the redefined parent has no shared RAM and a read-only disk, so starting it
        by mistake cannot change either.
        """
        assert self.record is not None and self.parent is not None
        # Owner-only, unlike the 0444 replica, because the parent's disk contains what its
        # first boot wrote, e.g. cloud-init's copy of user-data with the password hashes.
        # QEMU still reads it: libvirt makes each child's backing files QEMU's at start.
        os.chmod(self.os_disk, 0o400)
        xml = render_domain(dataclasses.replace(self.domain_spec(self.record),
                                                title=f"parent VM of pool {self.request.pool} "
                                                f"({self.request.inventory}); do not start"))
        self.domain = self.ctx.conn.defineXML(xml)
        volumes.refresh(self.ctx.pool)


def ensure_parent(ctx: HostContext, request: DesktopRequest, method: str,
                  access_key: keys.KeyPair, on_event: EventSink) -> ParentRecord:
    """Return the ready parent for ``request``'s pool, building it once if needed.

    Children of one pool call this concurrently: the first builds under the key's
    lock, the others wait and reuse it. Unusable parents (an interrupted build, a lost
    state file) are removed first unless children still use their disk.
    """
    key = parent_key(request, method, ctx.domain_type)
    with locks.named_lock(f"parent:{ctx.settings.uri}:{key}"):
        builds = [0]
        for domain, record in inventory_parents(ctx.conn, request.inventory):
            if record.key != key:
                continue
            if usable(record):
                return record
            builds.append(_build_number(domain.name()))
            _remove_if_unused(ctx, domain, record, on_event)
        name = parent_name(key, max(builds) + 1)
        on_event(name, "parent", f"building ({method})")
        job = ParentBuild(ctx, parent_request(request, name), access_key, on_event,
                          key=key, method=method)
        record = job.run_parent()
        on_event(name, "parent", f"ready in {record.build_seconds:.1f} s, state "
                 f"{record.state_bytes / 2**20:.1f} MiB")
        return record


def usable(record: ParentRecord) -> bool:
    """Return whether children can be made from this parent: saved, every file in place."""
    files = [record.disk, record.state_file] + ([record.ram_file] if record.ram_file else [])
    return record.state == "ready" and all(os.path.exists(path) for path in files)


def _build_number(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def inventory_parents(conn: libvirt.virConnect,
                      inventory: str) -> list[tuple[libvirt.virDomain, ParentRecord]]:
    found = []
    for domain in conn.listAllDomains(0):
        if not domain.name().startswith(PREFIX):
            continue
        record = read_record(domain)
        if record is not None and record.inventory == inventory:
            found.append((domain, record))
    return found


def remove_files(record: ParentRecord) -> None:
    """Remove a parent's state and RAM files (children already running keep their
    mapping of the RAM file; a cold boot of a child needs neither)."""
    for path in (record.state_file, record.ram_file):
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def remove_parent(ctx: HostContext, domain: libvirt.virDomain) -> None:
    """Remove a parent domain, its volumes and its files."""
    name = domain.name()
    record = read_record(domain)
    with contextlib.suppress(libvirt.libvirtError):
        if domain.isActive():
            domain.destroy()
    domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                         | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    if record is not None:
        remove_files(record)
        # By recorded path too: parents of older labctl versions had other volume names.
        for path in (record.disk, record.seed):
            _delete_volume_at(ctx, path)
    for volume in parent_volume_names(name):
        volumes.delete(ctx.pool, volume)
    log.info("removed parent %s", name)


def _delete_volume_at(ctx: HostContext, path: str) -> None:
    if not path or not os.path.basename(path).startswith(("labctl-parent-",
                                                           "labctl-labctl-parent-")):
        return
    try:
        volume = ctx.conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        return
    volumes.delete(volume.storagePoolLookupByVolume(), volume.name())


def parent_users(ctx: HostContext, record: ParentRecord, name: str) -> list[str]:
    """Domains and volumes (other than the parent's own) whose disks are backed by it."""
    users = replica_users(ctx.conn, ctx.pool, record.disk)
    return [user for user in users if user != f"domain {name}"]


def remove_unused_parents(ctx: HostContext, inventory: str, keep: set[str],
                          on_event: EventSink) -> list[str]:
    """Remove the inventory's parents that no child uses, except usable ones in ``keep``.

    ``keep`` contains the keys the inventory still needs. A parent of such a key that lost
    its files goes too once unused, because the next child builds a new one anyway.
    """
    removed = []
    for domain, record in inventory_parents(ctx.conn, inventory):
        if record.key in keep and usable(record):
            continue
        with locks.named_lock(f"parent:{ctx.settings.uri}:{record.key}"):
            if _remove_if_unused(ctx, domain, record, on_event):
                removed.append(record.key)
    return removed


def _remove_if_unused(ctx: HostContext, domain: libvirt.virDomain, record: ParentRecord,
                      on_event: EventSink) -> bool:
    name = domain.name()
    users = parent_users(ctx, record, name)
    if users:
        log.info("%s: kept, its disk backs %s", name, ", ".join(users))
        return False
    remove_parent(ctx, domain)
    on_event(name, "remove", "unused parent removed")
    return True
