"""Checkout and assignment: which desktop a user gets, recorded in the desktop's metadata.

A desktop is in use while its record has a session user, and free otherwise. A
dedicated desktop belongs to the user in its record's ``assigned_to``. The choice and
the write happen under the pool's lock (orchestrator.pools.claims), so two checkouts
never get the same desktop. When no desktop is free, checkout makes one (up to the
pool's size) and waits until it is ready.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import libvirt

from orchestrator import locks
from orchestrator.errors import ConflictError, LabctlError
from orchestrator.hosts.context import HostContext
from orchestrator.identity import keys
from orchestrator.inventory import Inventory
from orchestrator.inventory.model import Pool
from orchestrator.plan import READY_TIMEOUT
from orchestrator.pools import power
from orchestrator.pools.claims import pool_lock
from orchestrator.provision.steps import EventSink
from orchestrator.state import events, metadata
from orchestrator.state.metadata import DesktopRecord

log = logging.getLogger(__name__)

USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
USER_RULE = "1 to 64 letters, digits, '_', '.', '@' or '-', not starting with '.', '@' or '-'"

Found = tuple[libvirt.virDomain, DesktopRecord]


@dataclass
class Checkout:
    """A desktop handed to a user: its domain and record, and what checkout had to do."""

    domain: libvirt.virDomain
    record: DesktopRecord
    created: bool = False
    started: bool = False
    again: bool = False  # the user already had this desktop checked out


def check_user(user: str) -> None:
    """Raise unless ``user`` is a valid user name for sessions and assignments."""
    if not USER_RE.fullmatch(user):
        raise LabctlError(f"invalid user name {user!r}", fix=f"user names are {USER_RULE}")


def pool_of(inventory: Inventory, key: str) -> Pool:
    """Return the inventory's pool ``key``, or raise naming the pools there are."""
    if key not in inventory.pools:
        raise LabctlError(f"inventory {inventory.name} has no pool {key}",
                          where=str(inventory.path),
                          fix=f"use one of: {', '.join(sorted(inventory.pools))}")
    return inventory.pools[key]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pool_desktops(ctx: HostContext, inventory: str, pool: str) -> list[Found]:
    """Return the pool's desktops on a host, lowest desktop number first."""
    found = metadata.inventory_desktops(ctx.conn, inventory)
    members = [(domain, record) for domain, record in found.values() if record.pool == pool]
    return sorted(members, key=lambda item: (item[1].index, item[0].name()))


def choose(inventory: Inventory, key: str, user: str,
           desktops: list[Found]) -> tuple[Found | None, bool]:
    """Pick the user's desktop among the pool's; return it (None: make one) and whether the
    user already had it checked out."""
    pool = inventory.pools[key]
    for found in desktops:
        if found[1].session_user == user:
            return found, True
    if pool.assignment.type == "dedicated":
        own = [found for found in desktops if found[1].assigned_to == user]
        if own:
            return _usable(own[0], user), False
        if not pool.assignment.automatic:
            raise LabctlError(
                f"user {user} has no desktop in dedicated pool {key}, and the pool assigns "
                "none automatically", where=str(inventory.path),
                fix=f"labctl assign {inventory.path} DESKTOP --user {user}")
    free = [found for found in desktops if _is_free(found[1])]
    return (free[0] if free else None), False


def _is_free(record: DesktopRecord) -> bool:
    return record.state == "ready" and not record.session_user and not record.assigned_to


def _usable(found: Found, user: str) -> Found:
    domain, record = found
    if record.session_user and record.session_user != user:
        raise ConflictError(f"{domain.name()} is assigned to {user} but in use by "
                            f"{record.session_user}", where=domain.name(),
                            fix="labctl release the desktop first")
    if record.state != "ready":
        raise LabctlError(f"{user}'s desktop {domain.name()} is {record.state}, not ready",
                          where=domain.name(),
                          fix="wait for its refresh, or run labctl apply to repair it")
    return found


def start_session(domain: libvirt.virDomain, record: DesktopRecord, user: str,
                  dedicated: bool) -> None:
    """Write the session (and, in a dedicated pool, the assignment) into the metadata."""
    record.session_user = user
    record.session_since = now()
    if dedicated:
        record.assigned_to = user
    metadata.write(domain, record)


def check_room(inventory: Inventory, key: str, count: int) -> None:
    """Raise unless the pool may get one more desktop now."""
    pool = inventory.pools[key]
    stopped = events.stopped_pools(inventory.name).get(key)
    if stopped is not None:
        raise LabctlError(
            f"pool {key} has no free desktop and is stopped at a provisioning error of "
            f"{stopped.desktop}: {stopped.message}", where=str(inventory.path),
            fix=f"fix the cause, then labctl clear {inventory.path} {key}")
    if not pool.provisioning.enabled:
        raise LabctlError(f"pool {key} has no free desktop and its provisioning is disabled",
                          where=inventory.where(("pools", key, "provisioning")),
                          fix="set provisioning.enabled: true, or wait for a release")
    if count >= pool.size:
        raise LabctlError(
            f"pool {key} has no free desktop: all {count} of its desktops (size {pool.size}) "
            "are in use" + (" or assigned" if pool.assignment.type == "dedicated" else ""),
            where=inventory.where(("pools", key, "size")),
            fix="wait for a release (labctl release), or raise size:")


def assign(inventory: Inventory, ctx: HostContext, desktop: str, user: str | None) -> Found:
    """Assign a dedicated pool's desktop to ``user`` (None: remove its assignment)."""
    domain, record = find_desktop(inventory, ctx, desktop)
    pool = inventory.pools.get(record.pool)
    if pool is None or pool.assignment.type != "dedicated":
        raise LabctlError(f"{desktop} is in floating pool {record.pool}; only desktops of "
                          "dedicated pools are assigned", where=desktop,
                          fix="set assignment: {type: dedicated} on the pool")
    with pool_lock(inventory.name, record.pool):
        record = metadata.read(domain)
        _check_assignable(inventory, ctx, domain, record, user)
        record.assigned_to = user or ""
        metadata.write(domain, record)
    message = f"assigned to {user}" if user else "assignment removed"
    log.info("pool %s, desktop %s: %s", record.pool, desktop, message)
    events.record(inventory.name, "assign", message, pool=record.pool, desktop=desktop)
    return domain, record


def _check_assignable(inventory: Inventory, ctx: HostContext, domain: libvirt.virDomain,
                      record: DesktopRecord, user: str | None) -> None:
    name = domain.name()
    if record.session_user:
        raise ConflictError(f"{name} is in use by {record.session_user}", where=name,
                            fix=f"labctl release {inventory.path} {name} first")
    if user is None:
        return
    if record.assigned_to and record.assigned_to != user:
        raise ConflictError(f"{name} is assigned to {record.assigned_to}", where=name,
                            fix=f"labctl assign {inventory.path} {name} --remove first")
    for other, found in pool_desktops(ctx, inventory.name, record.pool):
        if found.assigned_to == user and other.name() != name:
            raise ConflictError(f"{user} already has desktop {other.name()} in pool "
                                f"{record.pool}", where=name,
                                fix=f"labctl assign {inventory.path} {other.name()} --remove "
                                "first")


def find_desktop(inventory: Inventory, ctx: HostContext, name: str) -> Found:
    """Return a desktop of the inventory by name, or raise saying how to list them."""
    try:
        domain = ctx.conn.lookupByName(name)
        record = metadata.read(domain)
    except libvirt.libvirtError:
        record = None
    if record is None or record.inventory != inventory.name:
        raise LabctlError(f"desktop {name} does not exist in inventory {inventory.name}",
                          where=ctx.settings.uri,
                          fix=f"labctl status {inventory.path} lists the desktops")
    return domain, record


def start_if_off(ctx: HostContext, checkout: Checkout, on_event: EventSink) -> None:
    """Start a checked-out desktop that its power policy shut down or saved.

    Called under the pool's lock: a domain restored from its managed save runs with the
    metadata of the moment it was saved, without this session, so the record is written
    into it again before any other checkout can read it.
    """
    checkout.started = power.start(ctx, checkout.domain, on_event)
    if checkout.started:
        metadata.write(checkout.domain, checkout.record)


def wait_started(ctx: HostContext, checkout: Checkout, inventory: Inventory,
                 on_event: EventSink) -> None:
    """Wait until a desktop that checkout started is ready again."""
    if not checkout.started:
        return
    access_key = keys.access_key(inventory.name, create=False)
    power.wait_running(checkout.domain, checkout.record, access_key.private, on_event,
                       timeout=READY_TIMEOUT[ctx.accelerator])


def run_lock(inventory: Inventory):
    """Return the inventory's run lock, which apply, refresh and destroy also take."""
    return locks.exclusive_run(f"inventory:{inventory.name}",
                               f"run on inventory {inventory.name}")
