"""Pool sizing and desktop naming: which desktops each pool should have now.

An up-front pool has ``size`` desktops. An on-demand pool has ``max(min, taken +
spare)`` of them, at most ``size``, where taken desktops are those in use (a session)
or assigned to a user, and every other desktop of the pool counts as a spare. A pool
with provisioning disabled, or stopped at a provisioning error, gets no new desktops.
A pool with more desktops than ``size`` loses free ones, highest number first, and
never one in use or assigned.

New desktops of pools with the same naming pattern take the lowest number that no
desktop of the inventory has under that pattern, so such pools share one space of
numbers. Existing desktops keep their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.inventory import Inventory
from orchestrator.inventory.model import Pool
from orchestrator.inventory.naming import NamePattern, parse_pattern
from orchestrator.state.metadata import DesktopRecord


@dataclass(frozen=True)
class Member:
    """A desktop a pool should have: an existing one (with its record) or a new one."""

    name: str
    number: int
    record: DesktopRecord | None = None


@dataclass
class PoolLayout:
    """The target of one pool: its desktops, the ones to delete, and why none are added."""

    pool: str
    desktops: list[Member] = field(default_factory=list)
    surplus: dict[str, str] = field(default_factory=dict)  # desktop -> reason to delete
    held: str = ""  # why the pool gets no new desktops; empty if nothing stops them


def is_taken(record: DesktopRecord) -> bool:
    """Return whether a desktop is in use (a session) or assigned to a user."""
    return bool(record.session_user or record.assigned_to)


def wanted_count(pool: Pool, taken: int, existing: int, grow: int = 0) -> int:
    """Return how many desktops ``pool`` should have; ``grow`` requests more than exist."""
    if pool.provisioning.mode == "up-front":
        wanted = pool.size
    else:
        policy = pool.provisioning
        wanted = max(policy.min_desktops, taken + policy.spare_desktops)
    if grow:
        wanted = max(wanted, existing + grow)
    return min(pool.size, wanted)


def layout(inventory: Inventory, records: dict[str, DesktopRecord], stopped: set[str],
           grow: dict[str, int] | None = None) -> dict[str, PoolLayout]:
    """Return each pool's layout, given the inventory's desktops by name and stopped pools."""
    grow = grow or {}
    layouts: dict[str, PoolLayout] = {}
    members = _members(inventory, records)
    for key, pool in inventory.pools.items():
        layouts[key] = _shrink(key, pool, members[key])
    used = _used_names(records, layouts)
    for key, pool in inventory.pools.items():
        current = layouts[key]
        taken = sum(is_taken(m.record) for m in current.desktops if m.record is not None)
        count = len(current.desktops)
        missing = wanted_count(pool, taken, count, grow.get(key, 0)) - count
        current.held = _held(pool, key, stopped) if missing > 0 else ""
        if missing > 0 and not current.held:
            current.desktops += _new_members(pool, missing, used)
        current.desktops.sort(key=lambda member: member.number)
    return layouts


def _held(pool: Pool, key: str, stopped: set[str]) -> str:
    if key in stopped:
        return "stopped at a provisioning error (labctl clear)"
    if not pool.provisioning.enabled:
        return "provisioning is disabled (provisioning.enabled: false)"
    return ""


def _number_in_pool(pool: Pool, name: str) -> int | None:
    """Return the number of ``name`` under the pool's naming, None if the pool never makes it."""
    if pool.naming is not None:
        return parse_pattern(pool.naming).number_of(name)
    assert pool.names is not None
    folded = [entry.casefold() for entry in pool.names]
    if name.casefold() in folded:
        return folded.index(name.casefold()) + 1
    return None


def _members(inventory: Inventory,
             records: dict[str, DesktopRecord]) -> dict[str, list[Member]]:
    """Return each pool's existing desktops whose names still fit its naming."""
    members: dict[str, list[Member]] = {key: [] for key in inventory.pools}
    for name, record in sorted(records.items()):
        pool = inventory.pools.get(record.pool)
        if pool is None:
            continue
        number = _number_in_pool(pool, name)
        if number is not None:
            members[record.pool].append(Member(name, number, record))
    return members


def _shrink(key: str, pool: Pool, members: list[Member]) -> PoolLayout:
    """Keep at most ``size`` desktops: drop free ones, highest number first."""
    result = PoolLayout(key, desktops=list(members))
    excess = len(members) - pool.size
    free = [m for m in members if m.record is not None and not is_taken(m.record)]
    for member in sorted(free, key=lambda m: m.number, reverse=True)[:max(0, excess)]:
        result.desktops.remove(member)
        result.surplus[member.name] = f"pool {key} has more than its size of {pool.size}"
    return result


@dataclass
class _UsedNames:
    """Casefolded names, and numbers per pattern, that desktops have or were just given."""

    names: set[str]
    records: list[str]
    numbers: dict[tuple[str, str, int], set[int]] = field(default_factory=dict)

    def numbers_of(self, pattern: NamePattern) -> set[int]:
        if pattern.key not in self.numbers:
            found = (pattern.number_of(name) for name in self.records)
            self.numbers[pattern.key] = {number for number in found if number is not None}
        return self.numbers[pattern.key]


def _used_names(records: dict[str, DesktopRecord],
                layouts: dict[str, PoolLayout]) -> _UsedNames:
    """Return the names of the inventory's desktops that stay (deleted ones are free again)."""
    deleted = {name for current in layouts.values() for name in current.surplus}
    staying = [name for name in records if name not in deleted]
    return _UsedNames(names={name.casefold() for name in staying}, records=staying)


def _new_members(pool: Pool, count: int, used: _UsedNames) -> list[Member]:
    if pool.names is not None:
        return _new_listed(pool.names, count, used)
    assert pool.naming is not None
    pattern = parse_pattern(pool.naming)
    numbers = used.numbers_of(pattern)
    new: list[Member] = []
    number = 0
    while len(new) < count:
        number += 1
        name = pattern.format(number)
        if number in numbers or name.casefold() in used.names:
            continue
        numbers.add(number)
        used.names.add(name.casefold())
        new.append(Member(name, number))
    return new


def _new_listed(names: list[str], count: int, used: _UsedNames) -> list[Member]:
    new: list[Member] = []
    for number, name in enumerate(names, start=1):
        if len(new) == count:
            break
        if name.casefold() not in used.names:
            used.names.add(name.casefold())
            new.append(Member(name, number))
    return new
