"""The recompose roll's scheduling, with the re-creation of a desktop replaced by a stub.

What runs for real elsewhere (tests/test_recompose.py) is slow under TCG, so the limits
are checked here: at most limits.provisioning at once, never fewer than min_ready free
ready desktops, and stop_on_error leaving the rest undone.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator import recompose
from orchestrator.errors import LabctlError
from orchestrator.inventory.model import RecomposePolicy


class Recorder:
    """A stand-in for re-creating a desktop that records how many ran at once."""

    def __init__(self, failing: set[str] = frozenset()):
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.order: list[str] = []
        self.max_running = 0
        self.ready_seen: list[int] = []
        self.failing = failing

    def __call__(self, roll, action) -> None:
        with self.lock:
            self.running.add(action.desktop)
            self.order.append(action.desktop)
            self.max_running = max(self.max_running, len(self.running))
            self.ready_seen.append(len(roll.ready))
        time.sleep(0.05)
        with self.lock:
            self.running.discard(action.desktop)
        if action.desktop in self.failing:
            raise LabctlError("made to fail", where=action.desktop)


def make_roll(policy: RecomposePolicy, ready: set[str], limit: int):
    inventory = SimpleNamespace(name="roll-test", pools={"lab": SimpleNamespace(recompose=policy)})
    ctx = SimpleNamespace(settings=SimpleNamespace(max_parallel=limit))
    return recompose._Roll(plan=SimpleNamespace(inventory=inventory), pool_key="lab", ctx=ctx,
                           access_key=None, on_event=lambda *_: None,
                           result=recompose.RecomposeResult(), ready=set(ready))


def actions(*names: str) -> list:
    return [SimpleNamespace(desktop=name) for name in names]


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_DATA_DIR", str(tmp_path))


def test_roll_respects_provisioning_limit(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(recompose, "_recompose_one", recorder)
    names = [f"d{n}" for n in range(6)]
    roll = make_roll(RecomposePolicy(min_ready=0), set(names), limit=2)
    recompose._run_roll(roll, actions(*names))
    assert sorted(roll.result.recomposed) == names
    assert recorder.max_running == 2, f"{recorder.max_running} ran at once, limit 2"


def test_roll_keeps_min_ready(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(recompose, "_recompose_one", recorder)
    names = ["d1", "d2", "d3", "d4"]
    roll = make_roll(RecomposePolicy(min_ready=3), set(names), limit=4)
    recompose._run_roll(roll, actions(*names))
    assert sorted(roll.result.recomposed) == names
    assert recorder.max_running == 1, "min_ready 3 of 4 allows one desktop down at a time"
    assert min(recorder.ready_seen) >= 3, f"ready desktops fell to {min(recorder.ready_seen)}"


def test_roll_stops_on_first_error(monkeypatch):
    recorder = Recorder(failing={"d1"})
    monkeypatch.setattr(recompose, "_recompose_one", recorder)
    roll = make_roll(RecomposePolicy(stop_on_error=True), {"d1", "d2", "d3"}, limit=1)
    recompose._run_roll(roll, actions("d1", "d2", "d3"))
    assert list(roll.result.failed) == ["d1"]
    assert roll.result.not_done == ["d2", "d3"], roll.result
    assert recorder.order == ["d1"], f"the roll went on after the failure: {recorder.order}"


def test_roll_goes_on_without_stop_on_error(monkeypatch):
    recorder = Recorder(failing={"d1"})
    monkeypatch.setattr(recompose, "_recompose_one", recorder)
    roll = make_roll(RecomposePolicy(stop_on_error=False), {"d1", "d2", "d3"}, limit=1)
    recompose._run_roll(roll, actions("d1", "d2", "d3"))
    assert list(roll.result.failed) == ["d1"]
    assert sorted(roll.result.recomposed) == ["d2", "d3"]
    assert roll.result.not_done == []
