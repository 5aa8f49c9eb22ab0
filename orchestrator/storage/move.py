"""Moving one desktop's OS disk to another storage pool of its host, as one transaction.

The steps run under the host's maintenance throttle. They check the free space, shut
the desktop down and copy the disk into the target storage pool, next to the replica
there (uploaded once). The copy is pointed at that replica (``qemu-img rebase -u``) and
verified with ``qemu-img info --backing-chain`` and ``qemu-img check``. Then the domain
is redefined with the new path, started again if it ran, and awaited until ready. Only
then is the old disk deleted. A failing step undoes the earlier ones, so the desktop is back on its
old disk. The NoCloud seed stays where it is: it is small and read-only.

The move is a journal operation of kind ``move``: its steps are recorded, with the old
definition, both disk paths and whether the desktop ran, so the next ``labctl apply`` or
``labctl rebalance`` finishes or rolls back a killed move (see move_recovery.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

from orchestrator import journal
from orchestrator.errors import GuestError, LabctlError, StorageError
from orchestrator.guest import agent
from orchestrator.hosts.context import HostContext
from orchestrator.images import catalog
from orchestrator.images.catalog import ImageVersion
from orchestrator.provision import readiness
from orchestrator.provision.desktop import os_volume_name
from orchestrator.provision.steps import EventSink, Step, run_steps
from orchestrator.state import metadata
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import pool as volumes
from orchestrator.storage import qemuimg
from orchestrator.storage.replica import Replica, ensure_replica, replica_lock

log = logging.getLogger(__name__)

KIND = "move"  # the journal operation kind of a disk move
SHUTDOWN_TIMEOUT = 120.0  # seconds a guest gets to power off before it is destroyed

ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")


@dataclass
class DiskMove:
    """State shared by the steps of one desktop's move."""

    ctx: HostContext
    domain: libvirt.virDomain
    record: DesktopRecord
    target: str  # storage pool name
    access_key: str  # private key for the SSH readiness check
    on_event: EventSink
    ready_timeout: float = 1200.0
    was_running: bool = False
    old_xml: str = ""
    new_disk: str = ""
    replica: Replica | None = None

    @property
    def name(self) -> str:
        return self.domain.name()

    @property
    def linked(self) -> bool:
        return self.record.clone != "full"

    def steps(self) -> list[Step]:
        return [
            Step("space", self.check_space),
            Step("shutdown", self.shut_down, self.start_old),
            Step("copy", self.copy, self.remove_copy),
            Step("verify", self.verify),
            Step("redefine", self.redefine, self.define_old),
            Step("start", self.start, self.stop),
            Step("remove-old", self.remove_old),
        ]

    def run(self) -> str:
        """Move the disk; return its new path."""
        self.old_xml = self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        self.was_running = bool(self.domain.isActive())
        run_steps(self.name, self.steps(), self.on_event, self.begin())
        return self.new_disk

    def begin(self) -> journal.Operation:
        """Record the move in the journal before its first step runs."""
        pool = self.ctx.storage(self.target)
        image = self.image()
        # A replica this move uploads is named in the operation, so a rollback removes it
        # once nothing uses it. Its volumes are not artifacts, because gc would then
        # delete a shared replica's volumes one by one.
        made_replica = (self.linked
                        and volumes.find_volume(pool, _replica_marker(image)) is None)
        new_disk = os.path.join(volumes.pool_path(pool), os_volume_name(self.name))
        return journal.begin(
            KIND, inventory=self.record.inventory, desktop=self.name, host=self.record.host,
            uri=self.ctx.settings.uri, storage_pool=self.target,
            artifacts=journal.Artifacts(domain=self.name,
                                        volumes=(os_volume_name(self.name),)),
            data={"definition": self.old_xml, "old_disk": self.record.disk,
                  "new_disk": new_disk, "was_running": self.was_running,
                  "replica": f"labctl-replica-{image.version}" if made_replica else ""})

    # -- steps ---------------------------------------------------------------------

    def check_space(self) -> None:
        """Fail before anything moves if the target lacks room for the disk (and replica)."""
        pool = self.ctx.storage(self.target)
        volumes.refresh(pool)
        available = int(pool.info()[3])
        needed = os.stat(self.record.disk).st_blocks * 512
        image = self.image()
        if self.linked and volumes.find_volume(pool, _replica_marker(image)) is None:
            needed += replica_bytes(image)
        if available < needed:
            raise StorageError(
                f"storage pool {self.target} has {available} bytes free, but desktop "
                f"{self.name} needs {needed} bytes there (its disk"
                f"{' and the replica of ' + image.ref if self.linked else ''})",
                where=f"desktop {self.name}",
                fix=f"free space in storage pool {self.target} or remove it from the "
                "pool's storage: list",
            )

    def shut_down(self) -> None:
        if self.domain.isActive():
            with self.ctx.power:
                shut_down(self.domain, timeout=SHUTDOWN_TIMEOUT)

    def start_old(self) -> None:
        """Start the desktop again on its old disk and wait for its guest agent."""
        if not self.was_running or self.domain.isActive():
            return
        with self.ctx.power:
            self.domain.create()
        try:
            agent.wait_for_agent(self.domain, timeout=self.ready_timeout)
        except GuestError as exc:
            log.warning("%s: back on its old disk, but its guest agent did not respond: %s",
                        self.name, exc)

    def copy(self) -> None:
        """Copy the disk into the target pool and point it at the replica there.

        The replica's lock is held until the copy names the replica as its backing file,
        so no cleanup removes the replica in between.
        """
        pool = self.ctx.storage(self.target)
        image = self.image()
        source = Path(self.record.disk)
        capacity = qemuimg.info(source).virtual_size
        with replica_lock(pool, image.version):
            self.replica = ensure_replica(pool, image)
            volume = volumes.upload(pool, os_volume_name(self.name), source, "qcow2",
                                    capacity=capacity, mode="0600")
            self.new_disk = volume.path()
            if self.linked:
                qemuimg.rebase(self.new_disk, self.replica.disk.path, self.replica.disk.format)
            volumes.refresh(pool)

    def remove_copy(self) -> None:
        if self.new_disk:
            volumes.delete(self.ctx.storage(self.target), os_volume_name(self.name))

    def verify(self) -> None:
        """Check the copy's chain and metadata with qemu-img (its own JSON output)."""
        chain = qemuimg.backing_chain(self.new_disk)
        expected = [self.new_disk]
        if self.linked:
            assert self.replica is not None
            expected.append(self.replica.disk.path)
            if chain[0].backing_format != self.replica.disk.format:
                raise StorageError(
                    f"the copy records backing format {chain[0].backing_format}, expected "
                    f"{self.replica.disk.format}", where=self.new_disk,
                    fix="check qemu-img rebase; the desktop stays on its old disk")
        if [layer.path for layer in chain] != expected:
            raise StorageError(
                f"the copy's backing chain is {[layer.path for layer in chain]}, expected "
                f"{expected}", where=self.new_disk,
                fix="check qemu-img rebase; the desktop stays on its old disk",
            )
        qemuimg.check(self.new_disk)

    def redefine(self) -> None:
        xml = retarget_xml(self.old_xml, self.record.disk, self.new_disk, self.replica)
        self.domain = self.ctx.conn.defineXML(xml)
        record = dataclasses.replace(self.record, disk=self.new_disk)
        metadata.write(self.domain, record)

    def define_old(self) -> None:
        self.domain = self.ctx.conn.defineXML(self.old_xml)

    def start(self) -> None:
        if not self.was_running:
            return
        with self.ctx.power:
            self.domain.create()
        try:
            wait_ready_again(self.domain, self.record, self.access_key,
                             timeout=self.ready_timeout)
        except BaseException:
            # The undo of the earlier steps needs the copy closed: it deletes it.
            self.stop()
            raise

    def stop(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            if self.domain.isActive():
                self.domain.destroy()

    def remove_old(self) -> None:
        volume = self.ctx.conn.storageVolLookupByPath(self.record.disk)
        volumes.delete(volume.storagePoolLookupByVolume(), volume.name())

    # -- helpers -------------------------------------------------------------------

    def image(self) -> ImageVersion:
        """Return the catalog version the desktop's disk is based on now."""
        name, _, version = self.record.image.partition("@")
        try:
            return catalog.resolve(name, version)
        except LabctlError as exc:
            raise StorageError(
                f"the image of desktop {self.name}, {self.record.image}, is no longer in the "
                "catalog, so its replica cannot be made in storage pool " + self.target,
                where=f"desktop {self.name}",
                fix="labctl recompose the pool onto an image in the catalog first",
            ) from exc


def _replica_marker(image: ImageVersion) -> str:
    return f"labctl-replica-{image.version}.complete"


def replica_bytes(image: ImageVersion) -> int:
    """Return the bytes a replica of ``image`` takes in a storage pool (uploads are not
    sparse)."""
    files = [Path(image.disk)]
    if image.boot:
        files += [image.boot_path(image.boot.kernel), image.boot_path(image.boot.initrd)]
    return sum(path.stat().st_size for path in files)


def retarget_xml(xml: str, old_disk: str, new_disk: str, replica: Replica | None) -> str:
    """Return a domain definition whose OS disk is ``new_disk`` on ``replica``."""
    root = ET.fromstring(xml)
    for disk in root.iter("disk"):
        source = disk.find("source")
        if source is None or source.get("file") != old_disk:
            continue
        source.set("file", new_disk)
        backing = disk.find("backingStore/source")
        if backing is not None and replica is not None:
            backing.set("file", replica.disk.path)
    if replica is not None and replica.kernel:
        for tag, path in (("os/kernel", replica.kernel), ("os/initrd", replica.initrd)):
            element = root.find(tag)
            if element is not None:
                element.text = path
    return ET.tostring(root, encoding="unicode")


def shut_down(domain: libvirt.virDomain, *, timeout: float) -> None:
    """Power a guest off through ACPI; destroy it if it is still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(libvirt.libvirtError):
        domain.shutdown()
    while time.monotonic() < deadline:
        if not domain.isActive():
            return
        time.sleep(0.5)
    log.warning("%s: did not power off within %.0f s; destroying it", domain.name(), timeout)
    domain.destroy()


def wait_ready_again(domain: libvirt.virDomain, record: DesktopRecord, access_key: str, *,
                     timeout: float) -> None:
    """Wait until a restarted desktop is ready: agent, identity, and SSH with its host key."""
    mode = record.extra.get("network_mode", "user")
    address = {"user": "127.0.0.1", "none": ""}.get(mode)
    if address is None:
        address = readiness.guest_address(domain, record.mac, timeout=timeout)
    expected = readiness.Expected(
        hostname=record.hostname, machine_id=record.machine_id, ssh_address=address,
        ssh_port=record.ssh_port or 22, login_user=record.extra.get("login_user", "root"),
        host_key=record.extra.get("ssh_host_key", ""),
    )
    readiness.wait_ready(domain, expected, access_key, timeout=timeout)
