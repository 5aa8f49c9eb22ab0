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
    """Return the directory of the journal, locks and event history (never the only record)."""
    return data_dir() / "state"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700 for the leaf) and return it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that is mode 0600 from its first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
