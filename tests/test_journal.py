"""The journal of operations and the crash hook, without libvirt.

Each test points labctl's data directory at its own temporary directory, so the
journal file is the test's own.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from orchestrator import cancel, journal
from orchestrator.provision.steps import (Step, StepFailed, interrupted_desktops,
                                           run_steps)


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_DATA_DIR", str(tmp_path))
    monkeypatch.delenv(journal.CRASH_VARIABLE, raising=False)
    return tmp_path


def begin(desktop: str = "d1") -> journal.Operation:
    return journal.begin("provision", inventory="inv", desktop=desktop, host="local",
                         uri="test:///default", storage_pool="pool",
                         artifacts=journal.Artifacts(domain=desktop, volumes=("v1", "v2")),
                         data={"clone": "linked"})


def ignore(_desktop: str, _step: str, _status: str) -> None:
    pass


def test_journal_file_private():
    begin()
    mode = stat.S_IMODE(os.stat(journal.journal_path()).st_mode)
    assert mode == 0o600, f"journal mode {mode:o}"


def test_step_recorded_before_it_runs():
    operation = begin()
    seen: list[str] = []

    def look() -> None:
        [stored] = journal.operations(inventory="inv")
        seen.append(stored.step_state("second"))

    run_steps("d1", [Step("first", lambda: None), Step("second", look)], ignore, operation)
    assert seen == ["started"], f"while 'second' ran the journal had {seen}"
    [stored] = journal.operations(inventory="inv")
    assert stored.state == journal.DONE
    assert [(s.name, s.state) for s in stored.steps] == [
        ("first", "started"), ("first", "done"), ("second", "started"), ("second", "done")]


def test_artifacts_and_data_read_back():
    begin("d7")
    [stored] = journal.operations(inventory="inv")
    assert stored.artifacts == journal.Artifacts(domain="d7", volumes=("v1", "v2"))
    assert stored.data == {"clone": "linked"}
    assert stored.pid == os.getpid()


def test_failed_step_undone_and_closed():
    operation = begin()

    def fail() -> None:
        raise RuntimeError("injected")

    steps = [Step("make", lambda: None, lambda: None), Step("break", fail)]
    with pytest.raises(StepFailed):
        run_steps("d1", steps, ignore, operation)
    [stored] = journal.operations(inventory="inv")
    assert stored.state == journal.FAILED
    assert stored.step_state("make") == "undone"
    assert stored.step_state("break") == "failed"


def test_interrupt_names_rolled_back_desktop():
    """An interrupt after a done step undoes it and names the desktop for the CLI."""
    undone: list[str] = []

    def interrupt() -> None:
        raise cancel.Cancelled("interrupted by the user")

    steps = [Step("make", lambda: None, lambda: undone.append("make")), Step("wait", interrupt)]
    with pytest.raises(StepFailed):
        run_steps("d-interrupted", steps, ignore)
    assert undone == ["make"]
    assert "d-interrupted" in interrupted_desktops()


def test_failed_undo_leaves_operation_running():
    operation = begin()

    def fail() -> None:
        raise RuntimeError("injected")

    steps = [Step("make", lambda: None, fail), Step("break", fail)]
    with pytest.raises(StepFailed):
        run_steps("d1", steps, ignore, operation)
    [stored] = journal.operations(inventory="inv")
    assert stored.state == journal.RUNNING, "an operation whose undo failed must be recovered"
    assert stored.step_state("make") == "undo-failed"


def test_live_operation_not_unfinished():
    begin()
    assert journal.unfinished("inv") == [], "this process's running operation was listed"


CRASHING_RUN = textwrap.dedent("""
    from orchestrator import journal
    from orchestrator.provision.steps import Step, run_steps
    operation = journal.begin("provision", inventory="inv", desktop="{desktop}",
                              host="local", uri="test:///default", storage_pool="pool",
                              artifacts=journal.Artifacts(domain="{desktop}"))
    steps = [Step(name, lambda: None) for name in ("a", "b", "c")]
    run_steps("{desktop}", steps, lambda *event: None, operation)
""")


def run_with_crash(data_dir, desktop: str, target: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABCTL_DATA_DIR": str(data_dir), journal.CRASH_VARIABLE: target,
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CRASHING_RUN.format(desktop=desktop)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_crash_hook_kills_after_step(data_dir):
    result = run_with_crash(data_dir, "lab-01", "b@lab-*")
    assert result.returncode == -signal.SIGKILL, f"exit {result.returncode}: {result.stderr}"
    [stored] = journal.unfinished("inv")
    assert stored.step_state("b") == "done"
    assert stored.step_state("c") == "", "a step after the crash point ran"


def test_crash_hook_other_desktop_ignored(data_dir):
    result = run_with_crash(data_dir, "lab-01", "b@other")
    assert result.returncode == 0, result.stderr
    [stored] = journal.operations(inventory="inv")
    assert stored.state == journal.DONE


def test_crash_hook_step_only(data_dir):
    result = run_with_crash(data_dir, "lab-01", "a")
    assert result.returncode == -signal.SIGKILL, result.stderr
    [stored] = journal.unfinished("inv")
    assert stored.step_state("b") == ""
