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

from orchestrator import paths
from orchestrator.errors import ConflictError

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


@contextlib.contextmanager
def exclusive_run(name: str, what: str, *,
                  fix: str = "wait for it to finish, or stop it with Ctrl-C so it rolls back",
                  ) -> Iterator[None]:
    """Hold the lock ``name`` for a whole command, or raise ConflictError if it is taken.

    ``what`` describes the lock's purpose for the error message, e.g. "apply of
    inventory demo", and ``fix`` the operator's next step. The holder's pid is written
    into the lock file for that message.
    """
    directory = paths.ensure_private_dir(paths.state_dir() / "locks")
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    with open(directory / f"{digest}.run", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConflictError(
                f"another labctl {what} is running (pid {holder})", fix=fix,
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
