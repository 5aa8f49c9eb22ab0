"""Locks shared by threads and by labctl processes on this machine.

Each lock is a threading.Lock plus an fcntl lock on a file under the state
directory, so two labctl runs on one machine also serialize. Runs on different
machines against the same host are not covered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from orchestrator import paths
from orchestrator.errors import ConflictError

_thread_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def _open_lock_file(path: Path) -> TextIO:
    """Open a lock file for reading and appending, creating it with mode 0600."""
    return os.fdopen(paths.open_private(path, os.O_RDWR | os.O_APPEND), "a+")


@contextlib.contextmanager
def named_lock(name: str) -> Iterator[None]:
    """Hold the lock ``name`` in this process and across processes."""
    with _guard:
        lock = _thread_locks.setdefault(name, threading.Lock())
    directory = paths.ensure_private_dir(paths.state_dir() / "locks")
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    with lock, _open_lock_file(directory / f"{digest}.lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_run(name: str, what: str) -> Iterator[None]:
    """Hold the lock ``name`` for a whole command, or raise ConflictError if it is taken.

    ``what`` describes the lock's purpose for the error message, e.g. "apply of
    inventory demo". The holder's pid is written into the lock file for that message.
    """
    directory = paths.ensure_private_dir(paths.state_dir() / "locks")
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    with _open_lock_file(directory / f"{digest}.run") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConflictError(
                f"another labctl {what} is running (pid {holder})",
                fix="wait for it to finish, or stop it with Ctrl-C so it rolls back",
            ) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
