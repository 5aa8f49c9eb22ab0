"""Provisioning as a sequence of named steps, each knowing how to undo itself.

A failing step undoes the completed ones in reverse order, so a desktop is either
made completely or leaves nothing behind. The error names the desktop and the step.
With a journal operation, each step is recorded before it runs and when it ends, so a
run killed midway can be cleaned up by the next one (see orchestrator/journal.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import cancel, journal
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


# Desktops whose steps an interrupt (Ctrl-C, SIGTERM) undid in this process, for the
# CLI's last message.
_interrupted: list[str] = []


def interrupted_desktops() -> list[str]:
    """Return the desktops whose done steps were undone because of an interrupt."""
    return list(_interrupted)


def run_steps(desktop: str, steps: list[Step], on_event: EventSink,
              operation: journal.Operation | None = None) -> None:
    """Run ``steps`` in order; on failure undo the done ones and raise StepFailed.

    With ``operation``, every step is journaled, and the operation ends "done" or
    "failed" (after the undo). A run killed in between leaves it "running".
    """
    done: list[Step] = []
    for step in steps:
        started = time.monotonic()
        on_event(desktop, step.name, "start")
        _journal(operation, step.name, "started")
        try:
            cancel.check()
            step.do()
        except BaseException as exc:
            on_event(desktop, step.name, "failed")
            _journal(operation, step.name, "failed")
            undone = _undo(desktop, done, on_event, operation)
            # An operation whose undo failed stays "running": the next run, once this
            # process has ended, removes what is left by name.
            if operation is not None and undone:
                journal.finish(operation, journal.FAILED)
            if done and isinstance(exc, (KeyboardInterrupt, cancel.Cancelled)):
                _interrupted.append(desktop)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            # An inner sequence of the same desktop (a refresh's provisioning) already named
            # its failed step. One of another machine (a parent VM) is wrapped, so the error
            # names this desktop and the step that needed it.
            if isinstance(exc, StepFailed) and exc.where == desktop:
                raise
            raise StepFailed(desktop, step.name, exc) from exc
        done.append(step)
        _journal(operation, step.name, "done")
        on_event(desktop, step.name, f"done in {time.monotonic() - started:.2f} s")
        journal.crash_if_requested(desktop, step.name)
    if operation is not None:
        journal.finish(operation, journal.DONE)


def _journal(operation: journal.Operation | None, step: str, state: str) -> None:
    if operation is not None:
        journal.record_step(operation, step, state)


def _undo(desktop: str, done: list[Step], on_event: EventSink,
          operation: journal.Operation | None) -> bool:
    """Undo the done steps in reverse order; return whether every undo succeeded."""
    complete = True
    for step in reversed(done):
        if step.undo is None:
            continue
        try:
            step.undo()
            on_event(desktop, step.name, "undone")
            _journal(operation, step.name, "undone")
        except Exception as exc:  # keep undoing the rest; report what stayed behind
            log.error("%s: undoing step %s failed: %s", desktop, step.name, exc)
            on_event(desktop, step.name, f"undo failed: {exc}")
            _journal(operation, step.name, "undo-failed")
            complete = False
    return complete
