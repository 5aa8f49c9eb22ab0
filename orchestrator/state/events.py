"""Lifecycle events of pools and desktops, kept in a small SQLite file for `labctl events`.

The history is a convenience for operators, never a record that labctl depends on:
desktops, assignments and sessions live in libvirt metadata. Old events are pruned so the
file stays small. The file is 0600: event messages may name users.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator import paths

KEEP_EVENTS = 10_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    inventory TEXT NOT NULL,
    pool TEXT NOT NULL,
    desktop TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Event:
    time: float
    inventory: str
    pool: str
    desktop: str
    kind: str
    message: str


@contextlib.contextmanager
def _database() -> Iterator[sqlite3.Connection]:
    directory = paths.ensure_private_dir(paths.state_dir())
    path = directory / "events.db"
    path.touch(mode=0o600, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30)
    try:
        connection.execute(_SCHEMA)
        with connection:
            yield connection
    finally:
        connection.close()


def record(inventory: str, kind: str, message: str, *, pool: str = "", desktop: str = "") -> None:
    """Add one event, e.g. ``record("lab", "checkout", "alice", pool="p", desktop="p-1")``."""
    with _database() as db:
        db.execute(
            "INSERT INTO events (time, inventory, pool, desktop, kind, message) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), inventory, pool, desktop, kind, message),
        )
        db.execute(
            "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (KEEP_EVENTS,)
        )


def recent(inventory: str, *, limit: int = 50, pool: str | None = None) -> list[Event]:
    """Return the newest events of an inventory (optionally one pool), oldest first."""
    query = "SELECT time, inventory, pool, desktop, kind, message FROM events WHERE inventory = ?"
    arguments: list[object] = [inventory]
    if pool is not None:
        query += " AND pool = ?"
        arguments.append(pool)
    query += " ORDER BY id DESC LIMIT ?"
    arguments.append(limit)
    with _database() as db:
        rows = db.execute(query, arguments).fetchall()
    return [Event(*row) for row in reversed(rows)]
