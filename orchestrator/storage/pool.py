"""Volumes in a libvirt storage pool: creation, upload, overlays and removal.

Everything goes through libvirt's storage API so it works the same on a remote
host (qemu+ssh). libvirt's pool refresh and volume creation race when run in
parallel, so each pool has one lock around them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt

from orchestrator import locks, render
from orchestrator.domain import DiskLayer
from orchestrator.errors import StorageError

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@contextlib.contextmanager
def pool_lock(pool: libvirt.virStoragePool) -> Iterator[None]:
    """Hold the lock of ``pool`` (per libvirt connection URI and pool name)."""
    key = f"{pool.connect().getURI()}#{pool.name()}"
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        yield


def ensure_pool(conn: libvirt.virConnect, name: str, path: str) -> libvirt.virStoragePool:
    """Return the active storage pool ``name``, defining a dir pool at ``path`` if missing."""
    # Two threads or labctl runs that both find no pool would both define it, and the
    # second define fails with "already exists".
    with locks.named_lock(f"storage-pool:{conn.getURI()}:{name}"):
        return _ensure_pool(conn, name, path)


def _ensure_pool(conn: libvirt.virConnect, name: str, path: str) -> libvirt.virStoragePool:
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        pool = None
    try:
        if pool is None:
            log.info("defining storage pool %s at %s", name, path)
            pool = conn.storagePoolDefineXML(render.render("pool.xml.j2", name=name, path=path))
            pool.build(0)
            pool.setAutostart(1)
        if not pool.isActive():
            pool.create(0)
    except libvirt.libvirtError as exc:
        raise StorageError(
            f"cannot set up storage pool {name}: {exc.get_error_message()}",
            where=path, fix="check that the directory can be created and is writable",
        ) from exc
    return pool


def pool_path(pool: libvirt.virStoragePool) -> str:
    return ET.fromstring(pool.XMLDesc()).findtext("target/path") or ""


def find_volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def volume_xml(name: str, capacity: int, fmt: str, *, mode: str = "0600",
               allocation: int | None = None, backing: DiskLayer | None = None) -> str:
    return render.render(
        "volume.xml.j2", name=name, capacity=capacity, format=fmt, mode=mode,
        allocation=allocation, backing=backing,
    )


def create_overlay(pool: libvirt.virStoragePool, name: str, backing: DiskLayer,
                   capacity: int) -> libvirt.virStorageVol:
    """Create a qcow2 overlay on ``backing`` (absolute path, format recorded)."""
    if not os.path.isabs(backing.path):
        raise StorageError("backing path must be absolute", where=backing.path)
    xml = volume_xml(name, capacity, "qcow2", allocation=0, backing=backing)
    return _create(pool, name, xml)


def create_empty(pool: libvirt.virStoragePool, name: str, capacity: int, fmt: str = "raw",
                 mode: str = "0600") -> libvirt.virStorageVol:
    return _create(pool, name, volume_xml(name, capacity, fmt, mode=mode, allocation=0))


def clone_volume(pool: libvirt.virStoragePool, name: str, source: libvirt.virStorageVol,
                 capacity: int, fmt: str = "qcow2") -> libvirt.virStorageVol:
    """Make an independent copy of ``source`` grown to ``capacity`` (reflink where possible)."""
    xml = volume_xml(name, capacity, fmt, allocation=0)
    with pool_lock(pool):
        volume = _copy(pool, name, xml, source)
        try:
            if capacity > volume.info()[1]:
                volume.resize(capacity, 0)
        except libvirt.libvirtError as exc:
            _remove_partial(pool, name)
            raise _storage_error(f"growing {name} to {capacity} bytes failed", exc,
                                 pool) from exc
        return volume


def _copy(pool: libvirt.virStoragePool, name: str, xml: str,
          source: libvirt.virStorageVol) -> libvirt.virStorageVol:
    try:
        return pool.createXMLFrom(xml, source, libvirt.VIR_STORAGE_VOL_CREATE_REFLINK)
    except libvirt.libvirtError as exc:
        log.debug("reflink copy of %s not possible (%s); copying", source.name(),
                  exc.get_error_message())
        _remove_partial(pool, name)
    try:
        return pool.createXMLFrom(xml, source, 0)
    except libvirt.libvirtError as exc:
        _remove_partial(pool, name)
        raise _storage_error(f"copying {source.name()} to {name} failed", exc, pool) from exc


def _create(pool: libvirt.virStoragePool, name: str, xml: str) -> libvirt.virStorageVol:
    with pool_lock(pool):
        try:
            return pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            _remove_partial(pool, name)
            raise _storage_error(f"creating volume {name} failed", exc, pool) from exc


def upload(pool: libvirt.virStoragePool, name: str, source: Path, fmt: str, *,
           capacity: int, mode: str = "0444") -> libvirt.virStorageVol:
    """Create volume ``name`` and stream the local file ``source`` into it, keeping holes."""
    # libvirtd runs as root, so it can still write a volume created read-only.
    volume = _create(pool, name, volume_xml(name, capacity, fmt, mode=mode, allocation=0))
    conn = pool.connect()
    try:
        _stream_file(conn, volume, source)
    except (libvirt.libvirtError, OSError) as exc:
        with contextlib.suppress(libvirt.libvirtError):
            volume.delete(0)
        message = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        raise StorageError(
            f"uploading {source} into volume {name} failed: {message}",
            where=f"storage pool {pool.name()}", fix="check free space in the storage pool",
        ) from exc
    return volume


def upload_bytes(pool: libvirt.virStoragePool, name: str, data: bytes, fmt: str = "raw", *,
                 mode: str = "0600") -> libvirt.virStorageVol:
    """Create volume ``name`` holding exactly ``data`` (e.g. a seed ISO)."""
    volume = _create(pool, name, volume_xml(name, len(data), fmt, mode=mode, allocation=0))
    stream = pool.connect().newStream(0)
    try:
        volume.upload(stream, 0, len(data), 0)
        stream.sendAll(lambda _s, nbytes, buf: buf.read(nbytes), _Reader(data))
        stream.finish()
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        with contextlib.suppress(libvirt.libvirtError):
            volume.delete(0)
        raise _storage_error(f"writing volume {name} failed", exc, pool) from exc
    return volume


class _Reader:
    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._offset = 0

    def read(self, size: int) -> bytes:
        chunk = self._data[self._offset:self._offset + size]
        self._offset += len(chunk)
        return bytes(chunk)


def _stream_file(conn: libvirt.virConnect, volume: libvirt.virStorageVol, source: Path) -> None:
    # NOTE: not a sparse stream: with libvirt 9.0, VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
    # into a file volume produced a copy that differed from the source (qemu-img then
    # read I/O errors). Golden qcow2 files are dense, so little is lost.
    stream = conn.newStream(0)
    volume.upload(stream, 0, 0, 0)
    with source.open("rb") as handle:
        try:
            stream.sendAll(lambda _stream, nbytes, fh: fh.read(nbytes), handle)
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise


def refresh(pool: libvirt.virStoragePool) -> None:
    """Rescan the pool's directory, unless another client is building a volume in it.

    libvirt rejects a refresh while a volume is built ("has asynchronous jobs running").
    Skipping it is safe for labctl's own volumes, because libvirt lists every volume
    created or deleted through its API without a refresh.
    """
    try:
        pool.refresh(0)
    except libvirt.libvirtError as exc:
        log.debug("not refreshing storage pool %s: %s", pool.name(), exc.get_error_message())


def delete(pool: libvirt.virStoragePool, name: str) -> bool:
    """Delete volume ``name`` if it exists; return whether it existed."""
    with pool_lock(pool):
        volume = find_volume(pool, name)
        if volume is None:
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
            volume = find_volume(pool, name)
        if volume is None:
            return False
        try:
            volume.delete(0)
        except libvirt.libvirtError as exc:
            raise _storage_error(f"deleting volume {name} failed", exc, pool) from exc
        return True


def _remove_partial(pool: libvirt.virStoragePool, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        volume = find_volume(pool, name)
        if volume is not None:
            volume.delete(0)


def _storage_error(what: str, exc: libvirt.libvirtError,
                   pool: libvirt.virStoragePool) -> StorageError:
    message = exc.get_error_message()
    fix = "check free space in the storage pool" if "space" in message.lower() else None
    return StorageError(f"{what}: {message}", where=f"storage pool {pool.name()}", fix=fix)
