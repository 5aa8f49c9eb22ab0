"""The event history behind `labctl events`: order, filtering, pruning and file mode."""

from __future__ import annotations

import pytest

from orchestrator import paths
from orchestrator.state import events


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_DATA_DIR", str(tmp_path))


def test_recent_events_oldest_first_per_inventory():
    events.record("inv", "checkout", "alice", pool="p", desktop="p-1")
    events.record("other", "checkout", "bob", pool="p", desktop="p-1")
    events.record("inv", "release", "alice", pool="p", desktop="p-1")
    kinds = [(e.kind, e.message) for e in events.recent("inv")]
    assert kinds == [("checkout", "alice"), ("release", "alice")]
    assert [e.message for e in events.recent("inv", pool="q")] == []


def test_history_is_pruned_and_private(monkeypatch):
    monkeypatch.setattr(events, "KEEP_EVENTS", 3)
    for number in range(6):
        events.record("inv", "step", str(number))
    assert [e.message for e in events.recent("inv")] == ["3", "4", "5"]
    mode = (paths.state_dir() / "events.db").stat().st_mode & 0o777
    assert mode == 0o600, f"events.db is {mode:o}, expected 600"


def test_stopped_pool_keeps_first_error():
    events.stop_pool("inv", "lab", "lab-1", "step 'seed' failed: disk full")
    events.stop_pool("inv", "lab", "lab-2", "a later error")
    stopped = events.stopped_pools("inv")
    assert list(stopped) == ["lab"]
    assert stopped["lab"].desktop == "lab-1"
    assert stopped["lab"].message == "step 'seed' failed: disk full"
    assert events.stopped_pools("other") == {}


def test_clear_pool_resumes_provisioning():
    events.stop_pool("inv", "lab", "lab-1", "failed")
    assert events.clear_pool("inv", "lab") is True
    assert events.stopped_pools("inv") == {}
    assert events.clear_pool("inv", "lab") is False
