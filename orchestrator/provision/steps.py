"""Provisioning as a sequence of named steps, each knowing how to undo itself.

A failing step undoes the completed ones in reverse order, so a desktop is either
made completely or leaves nothing behind. The error names the desktop and the step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import cancel
from orchestrator.errors import LabctlError
from orchestrator.hosts.connection import RECONNECT_FIX, connection_lost

log = logging.getLogger(__name__)


@dataclass
class Step:
    name: str
    do: Callable[[], object]
    undo: Callable[[], object] | None = None


class StepFailed(LabctlError):
    """A provisioning step failed; the completed steps were undone."""

    def __init__(self, desktop: str, step: str, cause: BaseException):
        message = cause.message if isinstance(cause, LabctlError) else str(cause)
        # Keep where the cause happened (a parent VM, a storage pool) unless it is the desktop.
        if isinstance(cause, LabctlError) and cause.where and cause.where != desktop:
            message = f"{cause.where}: {message}"
        fix = cause.fix if isinstance(cause, LabctlError) else None
        if connection_lost(cause):
            fix = RECONNECT_FIX
        super().__init__(f"step {step!r} failed: {message}", where=desktop, fix=fix)
        self.step = step
        self.cause = cause


EventSink = Callable[[str, str, str], None]


def run_steps(desktop: str, steps: list[Step], on_event: EventSink) -> None:
    """Run ``steps`` in order; on failure undo the done ones and raise StepFailed."""
    done: list[Step] = []
    for step in steps:
        started = time.monotonic()
        on_event(desktop, step.name, "start")
        try:
            cancel.check()
            step.do()
        except BaseException as exc:
            on_event(desktop, step.name, "failed")
            _undo(desktop, done, on_event)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise StepFailed(desktop, step.name, exc) from exc
        done.append(step)
        on_event(desktop, step.name, f"done in {time.monotonic() - started:.2f} s")


def _undo(desktop: str, done: list[Step], on_event: EventSink) -> None:
    for step in reversed(done):
        if step.undo is None:
            continue
        try:
            step.undo()
            on_event(desktop, step.name, "undone")
        except Exception as exc:  # keep undoing the rest; report what stayed behind
            log.error("%s: undoing step %s failed: %s", desktop, step.name, exc)
            on_event(desktop, step.name, f"undo failed: {exc}")
