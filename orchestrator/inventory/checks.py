"""Checks that span more than one value: key names, references, desktop names and hostnames."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import InventoryError
from orchestrator.inventory.fields import KEY_RE, KEY_RULE
from orchestrator.inventory.messages import did_you_mean, join_choices, quote, unknown_key
from orchestrator.inventory.model import DEFAULT_HOST, Host, Inventory, Pool
from orchestrator.inventory.naming import (
    FQDN_MAX,
    HOSTNAME_MAX,
    HOSTNAME_RE,
    NamingError,
    check_fits,
    expand_hostname,
    parse_pattern,
)
from orchestrator.inventory.positions import YamlMap, dotted

KEYED_SECTIONS = {"hosts": "host", "images": "image", "networks": "network", "pools": "pool"}
# Desktops of all pools together; far above a classroom, low enough to expand names quickly.
MAX_DESKTOPS = 100_000


def check_section_keys(document: YamlMap) -> None:
    """Raise unless every key under hosts, images, networks and pools is a valid name."""
    for section, singular in KEYED_SECTIONS.items():
        entries = document.get(section)
        if not isinstance(entries, YamlMap):
            continue
        for key in entries:
            if not KEY_RE.fullmatch(key):
                raise InventoryError(
                    f"{section}: invalid {singular} name {quote(key)}",
                    where=str(entries.mark_of(key)),
                    fix=f"use {KEY_RULE}",
                )


def check_defaults_keys(defaults: YamlMap) -> None:
    """Raise on a key of ``defaults:`` that no pool has (it would otherwise go unnoticed)."""
    allowed = list(Pool.model_fields)
    for key in defaults:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise InventoryError(
                f"defaults: unknown key {unknown_key(key)}",
                where=str(defaults.mark_of(key)),
                fix=hint or f"defaults take pool keys: {', '.join(allowed)}",
            )


def check_inventory(inventory: Inventory) -> None:
    """Raise on a pool that names a missing host, image or network, or on clashing names."""
    for key, host in inventory.hosts.items():
        _check_host_storage(inventory, key, host)
    for name, pool in inventory.pools.items():
        _check_reference(inventory, name, "image", pool.image, inventory.images)
        _check_reference(inventory, name, "host", pool.host, inventory.hosts)
        if pool.network is not None:
            _check_reference(inventory, name, "network", pool.network, inventory.networks)
        _check_storage(inventory, name, pool)
    total = sum(pool.size for pool in inventory.pools.values())
    if total > MAX_DESKTOPS:
        raise InventoryError(
            f"the pools hold {total} desktops in all, more than {MAX_DESKTOPS}",
            where=inventory.where(("pools",)),
            fix="split the inventory",
        )
    _check_desktop_names(inventory)
    _check_hostnames(inventory)


def _check_reference(
    inventory: Inventory, pool: str, field: str, value: str, defined: dict[str, Any]
) -> None:
    if value in defined:
        return
    section = f"{field}s"
    path = ("pools", pool, field)
    known = join_choices(sorted(defined)) if defined else "none"
    fix = did_you_mean(value, defined) or f"add {quote(value)} under {section}:"
    if field == "host" and value == DEFAULT_HOST and not defined:
        fix = "define it under hosts:, or remove the empty hosts: to get the default local host"
    raise InventoryError(
        f"pools.{pool}.{field}: {field} {quote(value)} is not defined under {section}: "
        f"(defined: {known})",
        where=inventory.where(path),
        fix=fix,
    )


def _check_host_storage(inventory: Inventory, key: str, host: Host) -> None:
    """Raise on a storage pool name or directory that a host lists twice."""
    own = ("hosts", key, "storage")
    names = {host.storage.pool: (*own, "pool")}
    directories = {_directory(host.storage.path): (*own, "path")}
    for index, extra in enumerate(host.storage_pools):
        entry = ("hosts", key, "storage_pools", index)
        _once(inventory, names, extra.pool, (*entry, "pool"), "storage pool",
              "give each storage pool its own name, or remove this entry")
        _once(inventory, directories, _directory(extra.path), (*entry, "path"), "directory",
              "give each storage pool a directory of its own")


def _directory(path: str) -> str:
    return path.rstrip("/") or "/"


def _once(inventory: Inventory, seen: dict[str, tuple[str | int, ...]], value: str,
          path: tuple[str | int, ...], what: str, fix: str) -> None:
    """Raise if ``value`` is in ``seen`` already; else remember where it is."""
    first = seen.setdefault(value, path)
    if first != path:
        raise InventoryError(
            f"{dotted(path)}: {what} {quote(value)} is listed twice (first as "
            f"{dotted(first)})",
            where=inventory.where(path), fix=fix,
        )


def _check_storage(inventory: Inventory, name: str, pool: Pool) -> None:
    """Raise on a pools.NAME.storage entry that is not a storage pool of the pool's host,
    or one listed twice."""
    seen: dict[str, tuple[str | int, ...]] = {}
    for position, storage in enumerate(pool.storage):
        _once(inventory, seen, storage, ("pools", name, "storage", position), "storage pool",
              "list each storage pool once")
    host = inventory.hosts.get(pool.host)
    if host is None or not pool.storage:
        return
    known = [host.storage.pool] + [extra.pool for extra in host.storage_pools]
    if pool.clone == "instant" and pool.storage != [host.storage.pool]:
        raise InventoryError(
            f"pools.{name}.storage: instant clones stay in host {quote(pool.host)}'s own "
            f"storage pool {quote(host.storage.pool)}: their overlays sit on the parent VM's "
            "disk, which lives there",
            where=inventory.where(("pools", name, "storage")),
            fix="remove storage: from this pool, or use clone: linked to spread desktops",
        )
    for position, storage in enumerate(pool.storage):
        if storage in known:
            continue
        raise InventoryError(
            f"pools.{name}.storage: {quote(storage)} is not a storage pool of host "
            f"{quote(pool.host)} (it has: {join_choices(known)})",
            where=inventory.where(("pools", name, "storage", position)),
            fix=did_you_mean(storage, known)
            or f"add it under hosts.{pool.host}.storage_pools: with its pool: and path:",
        )


def _names_path(pool: Pool, name: str) -> tuple[str, ...]:
    return ("pools", name, "naming" if pool.naming is not None else "names")


def possible_names(inventory: Inventory) -> dict[str, list[tuple[int, str]]]:
    """Return, per pool, every (number, desktop name) that the pool's desktops may get.

    Pools with the same naming pattern share its numbers, and a desktop takes the lowest
    number that no desktop of any of them has. So each of these pools may get any number
    up to the sum of their sizes. A pool with names: gets exactly its names.
    """
    shared: dict[tuple[str, str, int], list[str]] = {}
    for name, pool in inventory.pools.items():
        if pool.naming is not None:
            shared.setdefault(parse_pattern(pool.naming).key, []).append(name)
    result: dict[str, list[tuple[int, str]]] = {}
    for name, pool in inventory.pools.items():
        if pool.names is not None:
            result[name] = list(enumerate(pool.names, start=1))
            continue
        assert pool.naming is not None
        pattern = parse_pattern(pool.naming)
        group = shared[pattern.key]
        total = sum(inventory.pools[member].size for member in group)
        if len(group) > 1:
            _check_shared_fits(inventory, name, group, total)
        result[name] = [(number, pattern.format(number)) for number in range(1, total + 1)]
    return result


def _check_shared_fits(inventory: Inventory, name: str, group: list[str], total: int) -> None:
    pool = inventory.pools[name]
    assert pool.naming is not None
    try:
        check_fits(pool.naming, parse_pattern(pool.naming), total)
    except NamingError as exc:
        raise InventoryError(
            f"pools.{name}.naming: pools {', '.join(group)} share the pattern "
            f"{pool.naming!r}, so their numbers go up to {total}: {exc.message}",
            where=inventory.where(("pools", name, "naming")),
            fix=exc.fix,
        ) from exc


def _check_desktop_names(inventory: Inventory) -> None:
    owners: dict[str, str] = {}
    patterns = {name: parse_pattern(pool.naming).key for name, pool in inventory.pools.items()
                if pool.naming is not None}
    for pool_name, numbered in possible_names(inventory).items():
        pool = inventory.pools[pool_name]
        for _number, desktop in numbered:
            owner = owners.setdefault(desktop.casefold(), pool_name)
            if owner == pool_name:
                continue
            if owner in patterns and patterns.get(pool_name) == patterns[owner]:
                continue  # the same pattern: the pools share its numbers
            first = inventory.where(_names_path(inventory.pools[owner], owner))
            second = inventory.where(_names_path(pool, pool_name))
            raise InventoryError(
                f"pools {owner!r} ({first}) and {pool_name!r} ({second}) both make the "
                f"desktop {desktop!r}",
                where=second,
                fix="change the naming of one of the pools, or give both the same pattern "
                "to share its numbers",
            )


def _check_hostnames(inventory: Inventory) -> None:
    seen: dict[str, str] = {}
    for pool_name, numbered in possible_names(inventory).items():
        pool = inventory.pools[pool_name]
        path = ("pools", pool_name, "identity", "hostname")
        pattern = pool.identity.hostname
        for number, desktop in numbered:
            hostname = expand_hostname(pattern, desktop, number, pool_name)
            _check_hostname(inventory, path, pattern, hostname, pool.identity.domain)
            previous = seen.setdefault(hostname.casefold(), desktop)
            if previous != desktop:
                raise InventoryError(
                    f"pools.{pool_name}.identity.hostname: desktops {previous!r} and "
                    f"{desktop!r} both get the hostname {hostname!r}",
                    where=inventory.where(path),
                    fix="include {name} or {n} in the hostname pattern",
                )


def _check_hostname(
    inventory: Inventory, path: tuple[str, ...], pattern: str, hostname: str, domain: str | None
) -> None:
    if len(hostname) > HOSTNAME_MAX or not HOSTNAME_RE.fullmatch(hostname):
        raise InventoryError(
            f"{'.'.join(path)}: pattern {pattern!r} makes {hostname!r}, which is not a valid "
            f"hostname",
            where=inventory.where(path),
            fix=f"hostnames are letters, digits and dashes, at most {HOSTNAME_MAX} characters; "
            "pool keys with '_' cannot go into {pool}",
        )
    if domain and len(hostname) + 1 + len(domain) > FQDN_MAX:
        raise InventoryError(
            f"{'.'.join(path)}: {hostname}.{domain} is longer than {FQDN_MAX} characters",
            where=inventory.where(path),
            fix="use a shorter domain",
        )
