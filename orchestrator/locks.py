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
def exclusive_run(name: str, what: str, *,
                  fix: str = "wait for it to finish and run this command again, or stop it "
                  "with Ctrl-C so it rolls back",
                  ) -> Iterator[None]:
    """Hold the lock ``name`` for a whole command, or raise ConflictError if it is taken.

    ``what`` describes the command for the error message, e.g. "apply of inventory
    demo". The holder writes its pid and ``what`` into the lock file, so the error
    names the command that has the lock, which may differ from the one rejected.
    """
    directory = paths.ensure_private_dir(paths.state_dir() / "locks")
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    with _open_lock_file(directory / f"{digest}.run") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            raise _held_error(handle.read(), what, fix) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {what}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _held_error(content: str, what: str, fix: str) -> ConflictError:
    """Return the error for a run lock held by the process described in ``content``.

    The holder may not have written its pid yet, or may be an older labctl that wrote
    only its pid. A missing description is replaced by the rejected command's ``what``.
    """
    pid, _, holder_what = content.strip().partition(" ")
    return ConflictError(
        f"another labctl {holder_what or what} is running (pid {pid or 'unknown'})",
        fix=fix,
    )
