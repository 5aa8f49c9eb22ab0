"""Exponential backoff per desktop: how long the controller waits before retrying one."""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST_DELAY = 10.0  # seconds before the first retry
MAX_DELAY = 600.0  # the delay doubles after each failure up to this


@dataclass
class _Entry:
    failures: int
    retry_at: float


@dataclass
class Backoff:
    """Failure counts and next retry times of desktops, kept in memory only.

    A restarted controller retries every desktop at once, so losing this state costs at
    most one early attempt per failing desktop.
    """

    first: float = FIRST_DELAY
    maximum: float = MAX_DELAY
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def failed(self, desktop: str, now: float) -> float:
        """Count a failure of ``desktop`` at ``now``; return the delay before its retry."""
        failures = self._entries[desktop].failures + 1 if desktop in self._entries else 1
        delay = min(self.maximum, self.first * 2 ** (failures - 1))
        self._entries[desktop] = _Entry(failures, now + delay)
        return delay

    def succeeded(self, desktop: str) -> None:
        """Forget the failures of ``desktop``, so its next failure waits ``first`` again."""
        self._entries.pop(desktop, None)

    def remaining(self, desktop: str, now: float) -> float:
        """Return the seconds ``desktop`` still has to wait at ``now`` (0: due)."""
        entry = self._entries.get(desktop)
        return 0.0 if entry is None else max(0.0, entry.retry_at - now)

    def failures(self, desktop: str) -> int:
        entry = self._entries.get(desktop)
        return 0 if entry is None else entry.failures

    def keep_only(self, desktops: set[str]) -> None:
        """Drop the entries of desktops that are no longer in the plan."""
        for name in set(self._entries) - desktops:
            del self._entries[name]
