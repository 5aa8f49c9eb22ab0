"""Reservations of MACs and SSH forward ports across the labctl processes of one machine.

A HostAllocator scans the host's domains once, so two labctl runs that provision at
the same time could both pick a value before either defines its domain. Each value
handed out is also recorded as a file named after it, containing the pid of the
process that reserved it. A reservation lapses when that process exits: by then the
value is in the XML of a defined domain, or its desktop was rolled back. Like the run
locks, reservations do not coordinate runs on different machines.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from orchestrator import locks, paths


class Reservations:
    """The reservations of one libvirt host, under the state directory."""

    def __init__(self, uri: str):
        digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
        self.directory = paths.state_dir() / "reservations" / digest
        self._lock_name = f"reservations:{uri}"

    def claim(self, kind: str, value: str) -> bool:
        """Reserve ``value`` for this process; return False if a running process has it.

        A value reserved earlier by this same process counts as taken too, because
        another allocator in this process handed it out.
        """
        path = self._path(kind, value)
        with locks.named_lock(self._lock_name):
            holder = _holder(path)
            if holder is not None and _running(holder):
                return False
            paths.ensure_private_dir(self.directory.parent)
            paths.ensure_private_dir(self.directory)
            paths.write_private_file(path, str(os.getpid()).encode())
            return True

    def prune(self) -> None:
        """Remove the reservations of processes that have exited."""
        if not self.directory.is_dir():
            return
        with locks.named_lock(self._lock_name):
            for path in self.directory.iterdir():
                holder = _holder(path)
                if holder is None or not _running(holder):
                    path.unlink(missing_ok=True)

    def _path(self, kind: str, value: str) -> Path:
        return self.directory / f"{kind}-{value.lower().replace(':', '-')}"


def _holder(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user
    return True
