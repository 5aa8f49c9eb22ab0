"""Staging directories of image builds: one per build, serialized per image name, always removed.

A root tree under construction can have /proc, /sys or /dev mounted inside it while
mmdebstrap runs. Removing such a tree recursively would delete files of the host, so
removal first checks the mount table and leaves a directory with mounts in place.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import ImageError

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")


def mounts_under(directory: Path) -> list[Path]:
    """Return the mount points at or below ``directory``, deepest first."""
    root = directory.resolve()
    found: list[Path] = []
    for line in MOUNTINFO.read_text().splitlines():
        fields = line.split()
        point = Path(_unescape(fields[4]))
        if point == root or root in point.parents:
            found.append(point)
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def remove_tree(directory: Path) -> bool:
    """Delete ``directory`` unless something is mounted inside it; return True if it is gone."""
    if not directory.exists():
        return True
    mounted = mounts_under(directory)
    if mounted:
        log.error("left %s in place because %s is still mounted inside it: unmount it and "
                  "delete the directory by hand", directory,
                  ", ".join(str(point) for point in mounted))
        return False
    try:
        shutil.rmtree(directory)
    except OSError as exc:
        log.error("cannot remove %s: %s", directory, exc)
        return False
    return True


@contextmanager
def build_lock(build_root: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock for building image ``name``, waiting for another build if needed."""
    lock_path = build_root / f"{name}.lock"
    try:
        build_root.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a")
    except OSError as exc:
        raise ImageError(f"cannot create the build lock: {exc.strerror}", where=str(lock_path),
                         fix="check the permissions of the image directory") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s, locked by another build of %s", lock_path, name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale(build_root: Path, name: str) -> None:
    """Delete staging directories that killed builds of ``name`` left (call with the lock held)."""
    for stale in build_root.glob(f"{name}-*"):
        if stale.is_dir():
            log.info("removing staging directory of an interrupted build: %s", stale)
            remove_tree(stale)


@contextmanager
def staging_dir(build_root: Path, name: str) -> Iterator[Path]:
    """Yield a new private directory for one build of ``name``; delete it when the block ends."""
    try:
        build_root.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=build_root))
    except OSError as exc:
        raise ImageError(f"cannot create a staging directory: {exc.strerror}",
                         where=str(build_root), fix="check the permissions and free space") from exc
    log.debug("staging directory %s", directory)
    try:
        yield directory
    finally:
        if remove_tree(directory):
            log.debug("removed staging directory %s", directory)


def free_bytes(directory: Path) -> int:
    """Return the bytes available to this user on the filesystem of ``directory``."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize
