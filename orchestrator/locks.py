"""Locks shared by threads and by labctl processes on this machine.

Each lock is a threading.Lock plus an fcntl lock on a file under the state
directory, so two labctl runs on one machine also serialize. Runs on different
machines against the same host are not covered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
from collections.abc import Iterator

from orchestrator import paths

_thread_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


@contextlib.contextmanager
def named_lock(name: str) -> Iterator[None]:
    """Hold the lock ``name`` in this process and across processes."""
    with _guard:
        lock = _thread_locks.setdefault(name, threading.Lock())
    directory = paths.ensure_private_dir(paths.state_dir() / "locks")
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    with lock, open(directory / f"{digest}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
