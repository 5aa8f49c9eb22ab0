"""Lifecycle events and stopped pools, kept in a small SQLite file in the state directory.

The event history behind `labctl events` is a convenience for operators. Desktops,
assignments and sessions live in libvirt metadata, never only here. The one fact kept
only here is a pool's provisioning error: a pool with stop_on_error stops at its first
error until `labctl clear`. The file is 0600 because event messages may name users.
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
);
CREATE TABLE IF NOT EXISTS pool_errors (
    inventory TEXT NOT NULL,
    pool TEXT NOT NULL,
    time REAL NOT NULL,
    desktop TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (inventory, pool)
);
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
        connection.executescript(_SCHEMA)
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


@dataclass(frozen=True)
class PoolError:
    """The error that stopped a pool's provisioning, kept until it is cleared."""

    time: float
    desktop: str
    message: str


def stop_pool(inventory: str, pool: str, desktop: str, message: str) -> bool:
    """Record the error that stops a pool's provisioning. The first error is kept.

    Returns whether this call stopped the pool, so callers record one "stopped" event."""
    with _database() as db:
        cursor = db.execute(
            "INSERT OR IGNORE INTO pool_errors (inventory, pool, time, desktop, message) "
            "VALUES (?, ?, ?, ?, ?)",
            (inventory, pool, time.time(), desktop, message),
        )
    return cursor.rowcount > 0


def stopped_pools(inventory: str) -> dict[str, PoolError]:
    """Return the inventory's stopped pools with the error that stopped each."""
    with _database() as db:
        rows = db.execute(
            "SELECT pool, time, desktop, message FROM pool_errors WHERE inventory = ?",
            (inventory,),
        ).fetchall()
    return {pool: PoolError(when, desktop, message) for pool, when, desktop, message in rows}


def clear_pool(inventory: str, pool: str) -> bool:
    """Clear a pool's error so provisioning resumes; return whether there was one."""
    with _database() as db:
        cursor = db.execute(
            "DELETE FROM pool_errors WHERE inventory = ? AND pool = ?", (inventory, pool)
        )
    return cursor.rowcount > 0
