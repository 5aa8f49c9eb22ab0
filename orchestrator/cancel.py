"""Cancellation of long waits when the user interrupts labctl (Ctrl-C, SIGTERM).

Worker threads cannot receive KeyboardInterrupt, so the main thread sets this event
and every wait loop calls ``check()``: the waiting step then fails, and provisioning
undoes what the desktop had so far.
"""

from __future__ import annotations

import threading

from orchestrator.errors import LabctlError

_cancelled = threading.Event()


class Cancelled(LabctlError):
    """The run was interrupted; the step that was waiting stopped."""

    exit_code = 130


def request() -> None:
    _cancelled.set()


def reset() -> None:
    _cancelled.clear()


def requested() -> bool:
    """Return whether the run was interrupted."""
    return _cancelled.is_set()


def check() -> None:
    """Raise Cancelled if the run was interrupted."""
    if _cancelled.is_set():
        raise Cancelled("interrupted by the user")


def sleep(seconds: float) -> None:
    """Sleep, waking early to raise Cancelled if the run is interrupted."""
    if _cancelled.wait(seconds):
        raise Cancelled("interrupted by the user")
