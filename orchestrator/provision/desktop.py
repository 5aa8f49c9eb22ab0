"""Full and linked clones: from a DesktopRequest to a defined, started, verified domain."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import libvirt

from orchestrator import journal
from orchestrator.domain import (
    DirectBoot, Disk, DiskLayer, DomainSpec, Interface, UserNetwork, render_domain,
)
from orchestrator.errors import ConflictError, LabctlError
from orchestrator.hosts.connection import is_local
from orchestrator.hosts.context import HostContext
from orchestrator.identity import keys
from orchestrator.identity.desktop import DesktopIdentity, UserAccount, build_seed, new_uuid
from orchestrator.provision import readiness, snapshot
from orchestrator.provision.request import DesktopRequest
from orchestrator.provision.steps import EventSink, Step, run_steps
from orchestrator.state import metadata
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import pool as volumes
from orchestrator.storage.replica import Replica, ensure_replica, replica_lock

log = logging.getLogger(__name__)


def os_volume_name(desktop: str) -> str:
    return f"labctl-{desktop}-os.qcow2"


def seed_volume_name(desktop: str) -> str:
    return f"labctl-{desktop}-seed.iso"


def console_log_path(desktop: str) -> str:
    return f"/var/log/libvirt/qemu/{desktop}-console.log"


@dataclass(frozen=True)
class KeptIdentity:
    """The identity a refreshed desktop keeps (UUID, MAC, SSH port and the user it is
    assigned to); its generation goes up."""

    uuid: str
    mac: str
    ssh_port: int
    generation: int
    assigned_to: str = ""

    @classmethod
    def of(cls, domain: libvirt.virDomain, record: DesktopRecord) -> KeptIdentity:
        return cls(domain.UUIDString(), record.mac, record.ssh_port, record.generation,
                   record.assigned_to)


@dataclass
class Provisioning:
    """State shared by the steps of one desktop's provisioning."""

    ctx: HostContext
    request: DesktopRequest
    access_key: keys.KeyPair
    on_event: EventSink
    replica: Replica | None = None
    identity: DesktopIdentity | None = None
    ssh_port: int = 0
    os_disk: str = ""
    seed: str = ""
    domain: libvirt.virDomain | None = None
    record: DesktopRecord | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # A refresh passes what the desktop keeps: UUID, MAC and SSH port.
    kept: KeptIdentity | None = None

    def steps(self) -> list[Step]:
        steps = [
            Step("check", self.check_name),
            Step("identity", self.make_identity),
            Step("os-disk", self.create_os_disk, self.remove_os_disk),
            Step("seed", self.create_seed, self.remove_seed),
            Step("define", self.define, self.undefine),
            Step("start", self.start, self.stop),
            Step("ready", self.wait_ready),
        ]
        if self.request.clone == "full":
            steps.append(Step("snapshot", self.take_snapshot))
        return steps + [Step("record", self.record_ready)]

    def run(self) -> DesktopRecord:
        started = time.monotonic()
        run_steps(self.request.name, self.steps(), self.on_event, self.begin_operation())
        self.timings["total"] = time.monotonic() - started
        assert self.record is not None
        return self.record

    @property
    def storage(self) -> libvirt.virStoragePool:
        """The storage pool of this desktop's volumes (plan places it over pools.NAME.storage)."""
        return self.ctx.storage(self.request.storage_pool)

    # The journal's name for this operation; a parent build has its own.
    operation_kind = "provision"

    def begin_operation(self) -> journal.Operation:
        """Record this provisioning in the journal, with the artifacts it may create."""
        request = self.request
        return journal.begin(
            self.operation_kind, inventory=request.inventory, desktop=request.name,
            host=request.host, uri=self.ctx.settings.uri,
            storage_pool=self.request.storage_pool or self.ctx.settings.storage_pool,
            artifacts=self.artifacts(),
            data={"clone": request.clone, "method": request.instant},
        )

    def artifacts(self) -> journal.Artifacts:
        return journal.Artifacts(domain=self.request.name,
                                 volumes=(self.os_volume(), self.seed_volume()))

    def os_volume(self) -> str:
        return os_volume_name(self.request.name)

    def seed_volume(self) -> str:
        return seed_volume_name(self.request.name)

    # -- steps ---------------------------------------------------------------------

    def check_name(self) -> None:
        _refuse_existing_domain(self.ctx, self.request.name)
        # With no domain of that name, labctl-named volumes of this desktop are
        # leftovers of an interrupted run: adopt them by removing them.
        for name in (self.os_volume(), self.seed_volume()):
            if volumes.delete(self.storage, name):
                log.info("%s: removed leftover volume %s", self.request.name, name)

    def make_identity(self) -> None:
        request = self.request
        users = tuple(
            UserAccount(
                name=user.name,
                ssh_authorized_keys=tuple(user.ssh_authorized_keys) + (self.access_key.public,),
                password_hash=user.password_hash,
                sudo=user.sudo,
                shell=user.shell,
            )
            for user in request.login_users
        )
        kept = self.kept
        self.identity = DesktopIdentity(
            name=request.name,
            hostname=request.hostname or request.name,
            fqdn=request.fqdn,
            uuid=kept.uuid if kept else new_uuid(),
            genid=new_uuid(),
            mac=kept.mac if kept else self.ctx.allocator.mac(),
            generation=kept.generation + 1 if kept else 1,
            ssh_host_key=keys.generate_ed25519(f"root@{request.name}"),
            users=users,
            timezone=request.timezone,
            run_once=request.run_once,
            root_authorized_keys=(self.access_key.public,),
        )
        if request.network.mode == "user":
            self.ssh_port = kept.ssh_port if kept and kept.ssh_port else (
                self.ctx.allocator.ssh_port())

    def create_os_disk(self) -> None:
        """Ensure the replica and create the desktop's disk on it under the replica's lock."""
        started = time.monotonic()
        pool, image = self.storage, self.request.image
        with replica_lock(pool, image.version):
            self.replica = ensure_replica(pool, image)
            self.timings["replica"] = time.monotonic() - started
            self._create_os_volume()
        self.timings["storage"] = time.monotonic() - started

    def backing_layers(self) -> tuple[DiskLayer, ...]:
        """Return the layers below the desktop's OS disk, nearest first (none for a full clone)."""
        assert self.replica is not None
        return (self.replica.disk,) if self.request.clone == "linked" else ()

    def _create_os_volume(self) -> None:
        assert self.replica is not None
        name = self.os_volume()
        if self.backing_layers():
            volume = volumes.create_overlay(self.storage, name, self.backing_layers()[0],
                                            self.request.disk_size)
        else:
            source = self.ctx.conn.storageVolLookupByPath(self.replica.disk.path)
            volume = volumes.clone_volume(self.storage, name, source, self.request.disk_size)
        self.os_disk = volume.path()

    def remove_os_disk(self) -> None:
        volumes.delete(self.storage, self.os_volume())

    def create_seed(self) -> None:
        started = time.monotonic()
        assert self.identity is not None
        name = self.seed_volume()
        data = build_seed(self.identity).to_iso()
        seed = volumes.upload_bytes(self.storage, name, data, mode="0600")
        self.seed = seed.path()
        self.timings["storage"] += time.monotonic() - started
        os_disk = self.ctx.conn.storageVolLookupByPath(self.os_disk)
        self.timings["disk_bytes"] = float(os_disk.info()[2] + seed.info()[2])

    def remove_seed(self) -> None:
        volumes.delete(self.storage, self.seed_volume())

    def define(self) -> None:
        started = time.monotonic()
        self.record = self.build_record()
        xml = render_domain(self.domain_spec(self.record, extra_args=self.define_args()))
        log.debug("%s: domain XML\n%s", self.request.name, xml)
        self.domain = self.ctx.conn.defineXML(xml)
        self.timings["define"] = time.monotonic() - started

    def define_args(self) -> tuple[str, ...]:
        """Extra QEMU arguments of the first definition (none for full and linked clones)."""
        return ()

    def undefine(self) -> None:
        """Destroy the domain and, unless it is transient (an instant clone before its
        definition), undefine it."""
        if self.domain is None:
            return
        try:
            persistent = self.domain.isPersistent()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return  # already gone
            raise
        with contextlib.suppress(libvirt.libvirtError):
            if self.domain.isActive():
                self.domain.destroy()
        if persistent:
            self.domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

    def start(self) -> None:
        """Start the domain, holding a slot of the host's power throttle (limits.power)."""
        started = time.monotonic()
        assert self.domain is not None
        with self.ctx.power:
            self.domain.create()
        self.timings["start"] = time.monotonic() - started

    def stop(self) -> None:
        if self.domain is not None and self.domain.isActive():
            with self.ctx.power:
                self.domain.destroy()

    def wait_ready(self) -> None:
        assert self.domain is not None and self.identity is not None
        expected = readiness.Expected(
            hostname=self.identity.hostname,
            machine_id=self.identity.machine_id,
            ssh_address="127.0.0.1",
            ssh_port=self.ssh_port or 22,
            login_user=self.request.login_user,
            host_key=self.identity.ssh_host_key.public,
            cloud_init=self.request.image.identity == "cloud-init",
        )
        if self.request.network.mode == "none":
            expected = dataclasses.replace(expected, ssh_address="")
        elif self.request.network.mode != "user":
            address = readiness.guest_address(self.domain, self.identity.mac,
                                              timeout=self.request.ready_timeout)
            expected = dataclasses.replace(expected, ssh_address=address)
        result = readiness.wait_ready(self.domain, expected, self.access_key.private,
                                      timeout=self.request.ready_timeout)
        self.timings["boot_to_ready"] = result.total
        self.timings["agent"] = result.agent_seconds

    def take_snapshot(self) -> None:
        """Take the post-customization snapshot that a refresh reverts to (full clones).

        A desktop without it is still usable: its refresh copies the image again. So a
        failure is logged, not raised.
        """
        assert self.domain is not None and self.record is not None
        if not is_local(self.ctx.settings.uri):
            log.info("%s: no post-customization snapshot on remote host %s: the revert "
                     "runs qemu-img on this machine", self.request.name, self.ctx.settings.uri)
            return
        started = time.monotonic()
        try:
            snapshot.take_snapshot(self.domain, self.os_disk, self.record)
        except (LabctlError, libvirt.libvirtError) as exc:
            log.warning("%s: taking the post-customization snapshot failed, so a refresh "
                        "will copy the image again: %s", self.request.name, exc)
            return
        self.timings["snapshot"] = time.monotonic() - started

    def record_ready(self) -> None:
        assert self.domain is not None and self.record is not None
        self.record.state = "ready"
        self.record.ready_seconds = round(
            sum(self.timings.get(key, 0.0) for key in ("storage", "define", "start",
                                                       "boot_to_ready")), 2)
        metadata.write(self.domain, self.record)

    # -- helpers -------------------------------------------------------------------

    def build_record(self) -> DesktopRecord:
        request, identity = self.request, self.identity
        assert identity is not None
        return DesktopRecord(
            inventory=request.inventory,
            pool=request.pool,
            index=request.index,
            clone=request.clone,
            image=request.image.ref,
            host=request.host,
            hostname=identity.hostname,
            fqdn=identity.fqdn,
            machine_id=identity.machine_id,
            mac=identity.mac,
            disk=self.os_disk,
            seed=self.seed,
            network=request.network.name,
            ssh_port=self.ssh_port,
            generation=identity.generation,
            state="provisioning",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config_hash=request.config_hash(),
            assigned_to=self.kept.assigned_to if self.kept else "",
            extra={
                "ssh_host_key": identity.ssh_host_key.public,
                "login_user": request.login_user,
                "hardware_hash": request.hardware_hash(),
                "network_mode": request.network.mode,
                "inventory_path": request.inventory_path,
            },
        )

    def disks(self) -> tuple[Disk, ...]:
        return (
            Disk(self.os_disk, "qcow2", "vda", backing=self.backing_layers()),
            Disk(self.seed, "raw", "vdb", readonly=True, serial="labctl-seed"),
        )

    def domain_spec(self, record: DesktopRecord, *, nic: bool = True,
                    extra_args: tuple[str, ...] = ()) -> DomainSpec:
        """Return the desktop's domain spec. ``nic=False`` leaves the NIC out (instant clones get it
        hot-plugged), ``extra_args`` are QEMU arguments (instant-clone memory)."""
        request, identity, replica = self.request, self.identity, self.replica
        assert identity is not None and replica is not None
        boot = None
        if request.image.boot:
            boot = DirectBoot(replica.kernel, replica.initrd, request.image.boot.cmdline)
        interfaces: tuple[Interface, ...] = ()
        user_network = None
        if nic and request.network.mode == "user":
            user_network = UserNetwork(identity.mac, self.ssh_port)
        elif nic and request.network.mode in ("network", "bridge"):
            interfaces = (Interface(request.network.mode, request.network.source, identity.mac),)
        return DomainSpec(
            name=request.name,
            uuid=identity.uuid,
            genid=identity.genid,
            title=f"{request.pool} desktop {request.index} ({request.inventory})",
            domain_type=self.ctx.domain_type,
            memory_kib=request.memory_bytes // 1024,
            vcpus=request.vcpus,
            disks=self.disks(),
            metadata_xml=self.metadata_xml(record),
            boot=boot,
            interfaces=interfaces,
            user_network=user_network,
            console_log=console_log_path(request.name),
            agent=request.image.agent,
            emulator=self.ctx.emulator,
            extra_qemu_args=extra_args,
            share_pages=request.share_memory,
            tcg_cache_mib=request.tcg_cache_mib or self.ctx.settings.tcg_cache_mib,
        )

    def metadata_xml(self, record: DesktopRecord) -> str:
        return metadata.to_xml(record)


def _refuse_existing_domain(ctx: HostContext, name: str) -> None:
    try:
        ctx.conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    raise ConflictError(
        f"a domain named {name} already exists", where=ctx.settings.uri,
        fix="rename the pool's desktops or remove that domain yourself",
    )
