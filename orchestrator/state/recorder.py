"""An event sink that logs each desktop step and records lifecycle events in the history.

apply, refresh and destroy report their progress as step events (desktop, step,
status). This adapter passes them on unchanged and turns the few that end an
operation into lifecycle events for `labctl events`: created, replaced, refreshed,
started, updated, deleted, failed and interrupted.
"""

from __future__ import annotations

import logging
import threading
import time

from orchestrator.cancel import Cancelled
from orchestrator.errors import LabctlError
from orchestrator.provision.steps import EventSink, StepFailed
from orchestrator.state import events

log = logging.getLogger(__name__)

# The action behind a desktop's step events -> the step and status that end it, and the
# lifecycle event recorded then. A status matches when it starts with the given text.
_ENDINGS: dict[str, tuple[str, str, str]] = {
    "create": ("record", "done", "created"),
    "replace": ("record", "done", "replaced"),
    "outdated": ("record", "done", "replaced"),
    "refresh": ("record", "done", "refreshed"),
    "start": ("start", "done", "started"),
    "update": ("update", "done", "updated"),
    "delete": ("remove", "done", "deleted"),
}


class EventRecorder:
    """Forwards step events to ``sink`` and records lifecycle events of known desktops.

    ``actions`` maps each desktop to its pool and the action run on it (an action kind
    of the plan, or "refresh"). Step events of other names (parent VMs, hosts, images)
    are only forwarded and logged.
    """

    def __init__(self, inventory: str, sink: EventSink, actions: dict[str, tuple[str, str]]):
        self.inventory = inventory
        self.sink = sink
        self.actions = dict(actions)
        self._started: dict[str, float] = {}  # desktop -> monotonic time of its first event
        self._lock = threading.Lock()  # apply's worker threads share one recorder

    def __call__(self, desktop: str, step: str, status: str) -> None:
        self.sink(desktop, step, status)
        with self._lock:
            started = self._started.setdefault(desktop, time.monotonic())
        pool, action = self.actions.get(desktop, ("", ""))
        if pool:
            log.info("pool %s, desktop %s: %s %s", pool, desktop, step, status)
        else:
            log.info("%s: %s %s", desktop, step, status)
        ending = _ENDINGS.get(action)
        if ending is None:
            return
        end_step, end_status, kind = ending
        if step == end_step and status.startswith(end_status):
            elapsed = time.monotonic() - started
            events.record(self.inventory, kind, f"{action} finished in {elapsed:.1f} s",
                          pool=pool, desktop=desktop)

    def failed(self, desktop: str, error: LabctlError) -> None:
        """Record that the action on ``desktop`` failed (or was interrupted) with ``error``."""
        pool, action = self.actions.get(desktop, ("", ""))
        interrupted = isinstance(error, Cancelled) or (
            isinstance(error, StepFailed) and isinstance(error.cause, Cancelled))
        kind = "interrupted" if interrupted else "failed"
        message = str(error)
        prefix = f"{desktop}: "
        if message.startswith(prefix):
            message = message[len(prefix):]
        log.warning("pool %s, desktop %s: %s %s: %s", pool, desktop, action, kind, message)
        events.record(self.inventory, kind, f"{action}: {message}" if action else message,
                      pool=pool, desktop=desktop)
