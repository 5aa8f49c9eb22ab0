"""Pruning of finished journal operations, without libvirt.

Each test has its own data directory, so the journal file is its own. Ages are set by
passing prune a ``now`` in the future instead of waiting.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from orchestrator import journal


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_DATA_DIR", str(tmp_path))
    return tmp_path


LATER = datetime.now(timezone.utc) + journal.PRUNE_AGE + timedelta(days=1)


def operation(kind: str = "provision", desktop: str = "d1", *, state: str = journal.DONE,
              inventory: str = "inv", volumes: tuple[str, ...] = ("v1",)) -> int:
    """Record an operation of ``kind`` and end it in ``state``; return its id."""
    started = journal.begin(kind, inventory=inventory, desktop=desktop, host="local",
                            uri="test:///default", storage_pool="pool",
                            artifacts=journal.Artifacts(domain=desktop, volumes=volumes))
    journal.record_step(started, "only", "done")
    if state != journal.RUNNING:
        journal.finish(started, state)
    return started.id


def ids(inventory: str = "inv") -> list[int]:
    return sorted(op.id for op in journal.operations(inventory=inventory))


def test_prune_keeps_young_operations():
    first = operation()
    second = operation()
    assert journal.prune("inv") == 0
    assert ids() == [first, second], "operations younger than PRUNE_AGE were pruned"


def test_prune_old_superseded_operation():
    operation()
    second = operation()
    assert journal.prune("inv", now=LATER) == 1
    assert ids() == [second], f"expected only the newest proof {second}, found {ids()}"


def test_prune_deletes_steps_too():
    first = operation()
    operation()
    journal.prune("inv", now=LATER)
    with journal._connect() as db:
        left = db.execute("SELECT COUNT(*) FROM steps WHERE operation = ?", (first,)).fetchone()
    assert left[0] == 0, f"{left[0]} steps of the pruned operation {first} stayed"


def test_prune_keeps_newest_proof_of_artifacts():
    only = operation()
    other = operation(volumes=("v1", "v2"))
    assert journal.prune("inv", now=LATER) == 0
    assert ids() == [only, other], "an operation naming other volumes was pruned"


def test_prune_keeps_running_operations():
    running = operation(state=journal.RUNNING)
    newer = operation()
    journal.prune("inv", now=LATER)
    assert running in ids(), "a running operation was pruned"
    assert newer in ids(), "the newest finished operation was pruned"


def test_prune_removed_desktop_entirely():
    operation()
    operation("remove", volumes=("v1",))
    kept = operation(desktop="d2")
    assert journal.prune("inv", now=LATER) == 2
    assert ids() == [kept], f"only the other desktop's operation should stay: {ids()}"


def test_prune_keeps_removal_that_failed():
    made = operation()
    removal = operation("remove", state=journal.FAILED)
    journal.prune("inv", now=LATER)
    assert made in ids(), "the proof of a desktop whose removal failed was pruned"
    assert removal in ids(), "the newest removal was pruned"


def test_prune_bounds_count_per_inventory():
    made = [operation() for _ in range(6)]
    assert journal.prune("inv", keep=3) == 3
    assert ids() == made[3:], f"expected the 3 newest operations {made[3:]}, found {ids()}"


def test_prune_other_inventory_untouched():
    theirs = [operation(inventory="other") for _ in range(2)]
    operation()
    journal.prune("inv", now=LATER)
    assert ids("other") == theirs, "pruning inv removed operations of another inventory"


def test_prune_without_journal_file():
    assert journal.prune("inv") == 0
    assert not journal.journal_path().exists(), "prune created a journal file"
