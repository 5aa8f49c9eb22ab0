"""Placement: which storage pool of a pool's ``storage:`` list stores each desktop's volumes.

A desktop that exists stays where it is while its storage pool is still listed; a new
one (or one whose storage pool left the list) goes to the listed storage pool holding
the fewest of the pool's desktops, the first listed on a tie. ``labctl rebalance``
evens out the desktops that exist.
"""

from __future__ import annotations

import dataclasses
import os

from orchestrator.inventory import Inventory
from orchestrator.provision.request import DesktopRequest
from orchestrator.state.metadata import DesktopRecord


def storage_of(disk: str, paths: dict[str, str]) -> str:
    """Return the name of the storage pool whose directory contains ``disk`` ("" if none)."""
    directory = os.path.dirname(os.path.normpath(disk))
    for name, path in paths.items():
        if os.path.normpath(path) == directory:
            return name
    return ""


def least_used(counts: dict[str, int]) -> str:
    """Return the storage pool with the fewest desktops (the first listed on a tie)."""
    return min(counts, key=lambda name: counts[name])


def place(inventory: Inventory, paths: dict[str, str], requests: list[DesktopRequest],
          observed: dict[str, DesktopRecord]) -> list[DesktopRequest]:
    """Return ``requests`` with ``storage_pool`` set for pools that list ``storage:``.

    ``paths`` maps the host's storage pools to their directories; ``observed`` contains the
    records of the desktops that exist, by name.
    """
    placed = []
    counts_by_pool: dict[str, dict[str, int]] = {}
    for key, pool in inventory.pools.items():
        if pool.storage and pool.clone != "instant":
            counts_by_pool[key] = _counts(pool.storage, key, paths, observed)
    for request in requests:
        counts = counts_by_pool.get(request.pool)
        if counts is None:
            placed.append(request)
            continue
        record = observed.get(request.name)
        current = storage_of(record.disk, paths) if record is not None else ""
        if current not in counts:
            current = least_used(counts)
            counts[current] += 1
        placed.append(dataclasses.replace(request, storage_pool=current))
    return placed


def _counts(storage: list[str], pool: str, paths: dict[str, str],
            observed: dict[str, DesktopRecord]) -> dict[str, int]:
    counts = dict.fromkeys(storage, 0)
    for record in observed.values():
        where = storage_of(record.disk, paths)
        if record.pool == pool and where in counts:
            counts[where] += 1
    return counts
