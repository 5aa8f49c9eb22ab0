"""Paths of labctl's files on the machine it runs on (not on the libvirt hosts)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Return the directory of the image catalog: $LABCTL_DATA_DIR, else XDG data home."""
    explicit = os.environ.get("LABCTL_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "labctl"


def images_dir() -> Path:
    return data_dir() / "images"


def state_dir() -> Path:
    """Return the directory of access keys, known_hosts files, locks and probe results.

    $LABCTL_STATE_DIR, else ``state`` under the data directory. It is never the only
    record of a desktop, because each domain carries its own in libvirt.
    """
    explicit = os.environ.get("LABCTL_STATE_DIR")
    if explicit:
        return Path(explicit)
    return data_dir() / "state"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 and return it.

    Below the state directory, the state directory itself and every level down to
    ``path`` get mode 0700 as well, so no file in it can be listed or opened by others.
    """
    path.mkdir(parents=True, exist_ok=True)
    root = state_dir()
    if path == root or root in path.parents:
        relative = path.relative_to(root).parts
        for depth in range(len(relative) + 1):
            root.joinpath(*relative[:depth]).chmod(0o700)
    else:
        path.chmod(0o700)
    return path


def open_private(path: Path, flags: int) -> int:
    """Open ``path`` with ``flags`` (plus O_CREAT) so that a new file is mode 0600.

    An existing file is set to 0600 too. Returns the file descriptor.
    """
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that is mode 0600 from its first byte on."""
    ensure_private_dir(path.parent)
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
