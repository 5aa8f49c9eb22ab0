"""labctl checkout: give a user a desktop of a pool, making one on demand if none is free."""

from __future__ import annotations

import logging

from orchestrator.apply import PoolStops, note, provision
from orchestrator.errors import LabctlError
from orchestrator.hosts.context import HostContext
from orchestrator.identity import keys
from orchestrator.inventory import Inventory
from orchestrator.plan import make_plan
from orchestrator.pools import sessions
from orchestrator.pools.claims import pool_lock
from orchestrator.pools.sessions import Checkout
from orchestrator.provision.steps import EventSink
from orchestrator.state import events

log = logging.getLogger(__name__)


def checkout(inventory: Inventory, ctx: HostContext, key: str, user: str,
             on_event: EventSink) -> Checkout:
    """Give ``user`` a desktop of pool ``key`` on its host ``ctx`` and start it if needed."""
    sessions.check_user(user)
    pool = sessions.pool_of(inventory, key)
    with pool_lock(inventory.name, key):
        desktops = sessions.pool_desktops(ctx, inventory.name, key)
        found, again = sessions.choose(inventory, key, user, desktops)
        created = found is None
        if found is None:
            sessions.check_room(inventory, key, len(desktops))
            found = _make_desktop(inventory, ctx, key, on_event)
        domain, record = found
        if not again:
            sessions.start_session(domain, record, user, pool.assignment.type == "dedicated")
        result = Checkout(domain, record, created=created, again=again)
        sessions.start_if_off(ctx, result, on_event)
    sessions.wait_started(ctx, result, inventory, on_event)
    message = f"{user} checked out {domain.name()}" + (" (made on demand)" if created else "")
    log.info("pool %s, desktop %s: %s", key, domain.name(), message)
    events.record(inventory.name, "checkout", message, pool=key, desktop=domain.name())
    return result


def _make_desktop(inventory: Inventory, ctx: HostContext, key: str,
                  on_event: EventSink) -> sessions.Found:
    """Provision one more desktop of the pool (under the inventory's run lock) and wait for it.

    The plan is asked to grow the pool by one; the new desktop gets the pool's next name.
    """
    with sessions.run_lock(inventory):
        plan = make_plan(inventory, build_images=True, grow={key: 1})
        try:
            actions = [action for action in plan.of_kind("create") if action.pool == key]
            if not actions:
                raise LabctlError(f"pool {key} cannot grow now: {plan.layouts[key].held}",
                                  where=str(inventory.path),
                                  fix="labctl plan shows why; wait for a release")
            action = actions[0]
            assert action.request is not None
            access_key = keys.access_key(inventory.name, create=True)
            stops = PoolStops(plan)
            try:
                provision(plan.hosts[action.host], action.request, access_key, on_event)
            except LabctlError as exc:
                stops.failed(action, exc)
                note(inventory.name, action, "failed", f"create on checkout failed: {exc}")
                raise
            note(inventory.name, action, "create", "ready (made on checkout)")
        finally:
            plan.close()
    return sessions.find_desktop(inventory, ctx, action.desktop)
