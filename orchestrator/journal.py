"""Journal of operations in flight: what an interrupted labctl run was doing.

An operation (provisioning a desktop, building a parent VM, refreshing a desktop) is
a sequence of named steps. The operation, with the names of the artifacts it may
create, and each step are written to an SQLite file in the state directory
(``journal.sqlite``, mode 0600) before they run. A run that dies leaves its operation
``running``. The next ``labctl apply``, ``refresh`` or ``gc`` of the inventory finds it
there and removes or adopts the artifacts by name (see orchestrator/recovery.py).

The journal is never the only record of a desktop: libvirt's domain metadata is. The
journal records what an interrupted run was doing, on which host and storage pool.
Finished operations let ``labctl gc`` prove that the volumes of a domain undefined by
hand are labctl's. ``prune`` deletes only finished operations whose proof a newer
operation repeats, or whose desktop a finished removal deleted (see its docstring).

Crash hook, for tests only: with ``LABCTL_CRASH_AFTER=STEP`` or ``STEP@DESKTOP``
(DESKTOP is an fnmatch pattern, e.g. ``save@labctl-parent-*``) labctl sends itself
SIGKILL right after that step of that desktop is recorded done. Unset, it does nothing.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from orchestrator import paths

log = logging.getLogger(__name__)

CRASH_VARIABLE = "LABCTL_CRASH_AFTER"
FILE_NAME = "journal.sqlite"
# Seconds a writer waits for another process's write to the journal to end.
BUSY_TIMEOUT = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    inventory TEXT NOT NULL,
    desktop TEXT NOT NULL,
    host TEXT NOT NULL,
    uri TEXT NOT NULL,
    storage_pool TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started TEXT NOT NULL,
    state TEXT NOT NULL,
    finished TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_open ON operations (state, inventory);
CREATE TABLE IF NOT EXISTS steps (
    operation INTEGER NOT NULL REFERENCES operations (id),
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (operation, seq)
);
"""

# Pruning: a finished operation that proves nothing new goes once it is older than
# PRUNE_AGE, or once the inventory has more than PRUNE_KEEP newer operations.
PRUNE_AGE = timedelta(days=30)
PRUNE_KEEP = 500

# Operation states: "running" until the operation ends "done" or "failed" (its steps
# were undone), or until a later run finds it interrupted and marks it "recovered".
RUNNING, DONE, FAILED, RECOVERED = "running", "done", "failed", "recovered"


@dataclass(frozen=True)
class Artifacts:
    """Deterministic names of the libvirt objects and files an operation may create."""

    domain: str = ""
    volumes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    # fnmatch patterns of files with a random part, e.g. restore's FIFOs.
    file_patterns: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"domain": self.domain, "volumes": list(self.volumes),
                "files": list(self.files), "file_patterns": list(self.file_patterns)}

    @classmethod
    def from_json(cls, data: dict) -> Artifacts:
        return cls(data.get("domain", ""), tuple(data.get("volumes", ())),
                   tuple(data.get("files", ())), tuple(data.get("file_patterns", ())))


@dataclass
class StepRecord:
    name: str
    state: str  # started | done | failed | undone | undo-failed


@dataclass
class Operation:
    """One operation row and its steps, as written by this run or read back."""

    id: int
    kind: str
    inventory: str
    desktop: str
    host: str
    uri: str
    storage_pool: str
    pid: int
    started: str
    state: str
    artifacts: Artifacts
    data: dict = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)

    def step_state(self, name: str) -> str:
        """Return the last recorded state of step ``name`` ("" if it never started)."""
        states = [step.state for step in self.steps if step.name == name]
        return states[-1] if states else ""


def journal_path() -> Path:
    return paths.state_dir() / FILE_NAME


@contextmanager
def _connect() -> Iterator[sqlite3.Connection]:
    """Open the journal (created mode 0600 on first use) for one transaction."""
    path = journal_path()
    paths.ensure_private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)) as db:
        db.executescript(SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def begin(kind: str, *, inventory: str, desktop: str, host: str, uri: str, storage_pool: str,
          artifacts: Artifacts, data: dict | None = None) -> Operation:
    """Record a new running operation and return it."""
    operation = Operation(0, kind, inventory, desktop, host, uri, storage_pool, os.getpid(),
                          _now(), RUNNING, artifacts, dict(data or {}))
    payload = json.dumps({"artifacts": artifacts.to_json(), **operation.data})
    with _connect() as db:
        cursor = db.execute(
            "INSERT INTO operations (kind, inventory, desktop, host, uri, storage_pool, pid, "
            "started, state, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, inventory, desktop, host, uri, storage_pool, operation.pid,
             operation.started, RUNNING, payload))
        operation.id = int(cursor.lastrowid or 0)
    log.debug("journal: operation %d %s of %s started", operation.id, kind, desktop)
    return operation


def record_step(operation: Operation, name: str, state: str) -> None:
    """Append a step state ("started" is written before the step runs)."""
    operation.steps.append(StepRecord(name, state))
    with _connect() as db:
        db.execute("INSERT INTO steps (operation, seq, name, state, at) VALUES (?, ?, ?, ?, ?)",
                   (operation.id, len(operation.steps), name, state, _now()))


def finish(operation: Operation, state: str) -> None:
    """Mark the operation done, failed or recovered."""
    operation.state = state
    with _connect() as db:
        db.execute("UPDATE operations SET state = ?, finished = ? WHERE id = ?",
                   (state, _now(), operation.id))


def operations(*, inventory: str | None = None, state: str | None = None) -> list[Operation]:
    """Return the recorded operations, newest first, optionally of one inventory or state."""
    if not journal_path().exists():
        return []
    query, arguments = "SELECT * FROM operations WHERE 1 = 1", []
    if inventory is not None:
        query += " AND inventory = ?"
        arguments.append(inventory)
    if state is not None:
        query += " AND state = ?"
        arguments.append(state)
    with _connect() as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(query + " ORDER BY id DESC", arguments).fetchall()
        found = [_operation(row) for row in rows]
        for operation in found:
            steps = db.execute("SELECT name, state FROM steps WHERE operation = ? ORDER BY seq",
                               (operation.id,)).fetchall()
            operation.steps = [StepRecord(row["name"], row["state"]) for row in steps]
    return found


def _operation(row: sqlite3.Row) -> Operation:
    data = json.loads(row["data"])
    artifacts = Artifacts.from_json(data.pop("artifacts", {}))
    return Operation(row["id"], row["kind"], row["inventory"], row["desktop"], row["host"],
                     row["uri"], row["storage_pool"], row["pid"], row["started"], row["state"],
                     artifacts, data)


def unfinished(inventory: str | None = None) -> list[Operation]:
    """Return the running operations of processes that no longer exist, newest first.

    The pid check skips operations of this process and of other live labctl runs, e.g.
    a ``labctl gc`` of all inventories while an apply runs.
    """
    return [operation for operation in operations(inventory=inventory, state=RUNNING)
            if not alive(operation.pid)]


def alive(pid: int) -> bool:
    """Return whether process ``pid`` exists (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # NOTE: a pid reused by an unrelated process makes the operation look alive; it is
    # recovered once that process ends.
    return True


def prune(inventory: str, *, max_age: timedelta = PRUNE_AGE, keep: int = PRUNE_KEEP,
          now: datetime | None = None) -> int:
    """Delete the inventory's finished operations that gc no longer needs; return how many.

    An operation may go if it is finished and either a newer operation of the same
    kind, desktop, host, storage pool and artifact names exists, or its desktop's newest
    operation is a removal that ended done. Such an operation is deleted once it
    finished more than ``max_age`` ago, or once ``keep`` newer operations of the
    inventory exist. Running operations and the newest proof of each artifact stay.
    """
    if not journal_path().exists():
        return 0
    cutoff = ((now or datetime.now(timezone.utc)) - max_age).isoformat(timespec="milliseconds")
    with _connect() as db:
        rows = db.execute(
            "SELECT id, kind, desktop, uri, storage_pool, state, finished, data "
            "FROM operations WHERE inventory = ? ORDER BY id DESC", (inventory,)).fetchall()
        doomed = [row[0] for rank, row in enumerate(_prunable(rows))
                  if row is not None and (rank >= keep or (row[6] or "") < cutoff)]
        for start in range(0, len(doomed), 500):
            chunk = doomed[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            db.execute(f"DELETE FROM steps WHERE operation IN ({marks})", chunk)
            db.execute(f"DELETE FROM operations WHERE id IN ({marks})", chunk)
    if doomed:
        log.info("journal: pruned %d finished operations of inventory %s", len(doomed),
                 inventory)
    return len(doomed)


def _prunable(rows: list[tuple]) -> list[tuple | None]:
    """Return ``rows`` (newest first) with None in place of those that must stay."""
    seen: set[tuple] = set()
    removed: set[tuple[str, str]] = set()  # (uri, desktop) whose newest operation removed it
    newest: set[tuple[str, str]] = set()
    result: list[tuple | None] = []
    for row in rows:
        _id, kind, desktop, uri, storage_pool, state, _finished, data = row
        place = (uri, desktop)
        if place not in newest:
            newest.add(place)
            if kind == "remove" and state == DONE:
                removed.add(place)
        artifacts = json.dumps(json.loads(data).get("artifacts", {}), sort_keys=True)
        key = (kind, desktop, uri, storage_pool, artifacts)
        repeated = key in seen
        seen.add(key)
        finished = state in (DONE, FAILED, RECOVERED)
        result.append(row if finished and (repeated or place in removed) else None)
    return result


def crash_if_requested(desktop: str, step: str) -> None:
    """SIGKILL this process if LABCTL_CRASH_AFTER names ``step`` (of ``desktop``)."""
    target = os.environ.get(CRASH_VARIABLE)
    if not target:
        return
    name, _, pattern = target.partition("@")
    if name == step and (not pattern or fnmatch.fnmatchcase(desktop, pattern)):
        log.warning("%s=%s: killing labctl after step %s of %s", CRASH_VARIABLE, target, step,
                    desktop)
        os.kill(os.getpid(), signal.SIGKILL)
