"""Replicas: one read-only copy of each image version per storage pool, shared by overlays.

Names are content-addressed (``labctl-replica-VERSION.FORMAT``), so every run and
every inventory on the host finds the same replica. A small ``.complete`` marker
volume is written after the upload finishes: a replica without it is the leftover of
an interrupted upload and is uploaded again.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from orchestrator import locks
from orchestrator.domain import DiskLayer
from orchestrator.errors import StorageError
from orchestrator.images.catalog import ImageVersion
from orchestrator.storage import pool as volumes

log = logging.getLogger(__name__)

PREFIX = "labctl-replica-"


@dataclass(frozen=True)
class Replica:
    disk: DiskLayer
    kernel: str = ""
    initrd: str = ""


def _names(image: ImageVersion) -> dict[str, str]:
    base = f"{PREFIX}{image.version}"
    names = {"disk": f"{base}.{image.format}", "marker": f"{base}.complete"}
    if image.boot:
        names["kernel"] = f"{base}.kernel"
        names["initrd"] = f"{base}.initrd"
    return names


def replica_lock(pool: libvirt.virStoragePool, version: str):
    """Lock one replica: held while it is uploaded, while an overlay is put on it, and
    while it is checked for users and removed, so it never goes away under a new overlay."""
    return locks.named_lock(f"replica:{pool.connect().getURI()}:{pool.name()}:{version}")


def ensure_replica(pool: libvirt.virStoragePool, image: ImageVersion) -> Replica:
    """Return the replica of ``image`` in ``pool``, uploading it once if it is missing.

    The caller must hold ``replica_lock`` for the image's version.
    """
    names = _names(image)
    if volumes.find_volume(pool, names["marker"]) is None:
        _upload(pool, image, names)
    disk = volumes.find_volume(pool, names["disk"])
    if disk is None:
        raise StorageError(
            f"replica {names['disk']} vanished from the storage pool", where=pool.name(),
            fix="run labctl apply again to upload it",
        )
    _require_readable(pool, disk)
    kernel = initrd = ""
    if image.boot:
        kernel_volume = pool.storageVolLookupByName(names["kernel"])
        initrd_volume = pool.storageVolLookupByName(names["initrd"])
        for volume in (kernel_volume, initrd_volume):
            _require_readable(pool, volume)
        kernel, initrd = kernel_volume.path(), initrd_volume.path()
    return Replica(DiskLayer(disk.path(), image.format), kernel, initrd)


def _require_readable(pool: libvirt.virStoragePool, volume: libvirt.virStorageVol) -> None:
    """Raise StorageError unless everyone may read ``volume``, as labctl uploaded it (0444).

    QEMU runs as its own user, so a replica whose mode was changed later fails only when
    a desktop on it starts, with QEMU's "Permission denied" on the file.
    """
    mode_text = ET.fromstring(volume.XMLDesc(0)).findtext("target/permissions/mode")
    if mode_text is None:
        return  # the storage backend does not report file modes
    mode = int(mode_text, 8)
    if mode & 0o004:
        return
    raise StorageError(
        f"replica volume {volume.name()} is not readable by QEMU (mode {mode:04o}, "
        "labctl uploads replicas with mode 0444)",
        where=f"storage pool {pool.name()}",
        fix=f"run chmod 0444 {volume.path()} on the host, or delete the volume so that "
        "labctl apply uploads the replica again",
    )


def _upload(pool: libvirt.virStoragePool, image: ImageVersion, names: dict[str, str]) -> None:
    log.info("uploading replica of %s into storage pool %s", image.ref, pool.name())
    _remove_members(pool, names)  # leftovers of an interrupted upload
    try:
        _upload_members(pool, image, names)
    except BaseException:
        # A failed upload (a full pool) leaves no part of the replica behind.
        try:
            _remove_members(pool, names)
        except (StorageError, libvirt.libvirtError) as exc:
            log.error("could not remove the partial replica of %s from storage pool %s: %s",
                      image.ref, pool.name(), exc)
        raise


def _remove_members(pool: libvirt.virStoragePool, names: dict[str, str]) -> None:
    for role in ("marker", "disk", "kernel", "initrd"):
        if role in names:
            volumes.delete(pool, names[role])


def _upload_members(pool: libvirt.virStoragePool, image: ImageVersion,
                    names: dict[str, str]) -> None:
    volumes.upload(pool, names["disk"], image.directory / image.disk.rsplit("/", 1)[-1],
                   image.format, capacity=image.virtual_size, mode="0444")
    if image.boot:
        for role, file_name in (("kernel", image.boot.kernel), ("initrd", image.boot.initrd)):
            source = image.boot_path(file_name)
            volumes.upload(pool, names[role], source, "raw", capacity=source.stat().st_size,
                           mode="0444")
    volumes.upload_bytes(pool, names["marker"], image.sha256.encode(), mode="0444")


def replica_users(conn: libvirt.virConnect, pool: libvirt.virStoragePool,
                  replica_path: str) -> list[str]:
    """Return the domains and volumes whose disks are backed by ``replica_path``."""
    users = []
    for domain in conn.listAllDomains(0):
        try:
            root = ET.fromstring(domain.XMLDesc(0))
        except libvirt.libvirtError:
            continue
        sources = {source.get("file") for source in root.iter("source")}
        sources |= {root.findtext("os/kernel"), root.findtext("os/initrd")}
        if replica_path in sources:
            users.append(f"domain {domain.name()}")
    volumes.refresh(pool)
    for volume in pool.listAllVolumes(0):
        try:
            volume_xml = volume.XMLDesc(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                continue  # deleted by another run after the listing
            raise
        backing = ET.fromstring(volume_xml).findtext("backingStore/path")
        if backing == replica_path:
            users.append(f"volume {volume.name()}")
    return users


def remove_unused(pool: libvirt.virStoragePool, only: str | None = None) -> list[str]:
    """Delete replicas no domain or volume uses any more; return the removed volume names.

    ``only`` limits it to one replica, by its base name (``labctl-replica-VERSION``).
    """
    conn = pool.connect()
    removed = []
    for base, marker in _markers(pool):
        if only is not None and base != only:
            continue
        with replica_lock(pool, base[len(PREFIX):]):
            removed += _remove_if_unused(pool, conn, base, marker)
    return removed


def unused(pool: libvirt.virStoragePool) -> list[str]:
    """Return the base names of the complete replicas that no domain or volume uses."""
    conn = pool.connect()
    return [base for base, marker in _markers(pool) if not _users(pool, conn, base, marker)]


def _markers(pool: libvirt.virStoragePool) -> list[tuple[str, str]]:
    with volumes.pool_lock(pool):
        volumes.refresh(pool)
        markers = [v.name() for v in pool.listAllVolumes(0)
                   if v.name().startswith(PREFIX) and v.name().endswith(".complete")]
    return [(marker[: -len(".complete")], marker) for marker in markers]


def _members(pool: libvirt.virStoragePool, base: str, marker: str) -> list:
    return [v for v in pool.listAllVolumes(0)
            if v.name().startswith(base + ".") and v.name() != marker]


def _users(pool: libvirt.virStoragePool, conn: libvirt.virConnect, base: str,
           marker: str) -> list[str]:
    return [user for volume in _members(pool, base, marker)
            for user in replica_users(conn, pool, volume.path())]


def _remove_if_unused(pool: libvirt.virStoragePool, conn: libvirt.virConnect, base: str,
                      marker: str) -> list[str]:
    if volumes.find_volume(pool, marker) is None:
        return []
    members = _members(pool, base, marker)
    if _users(pool, conn, base, marker):
        return []
    # The marker goes first, so an interruption leaves an incomplete replica, which
    # the next upload replaces, never a marker without its disk.
    volumes.delete(pool, marker)
    removed = []
    for volume in members:
        volumes.delete(pool, volume.name())
        removed.append(volume.name())
    log.info("removed unused replica %s", base)
    return removed
