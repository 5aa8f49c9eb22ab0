"""labctl checkout | release | assign | clear: sessions, assignments and stopped pools."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import libvirt

from orchestrator import output
from orchestrator.hosts.context import HostContext
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.plan import open_inventory_host
from orchestrator.pools import checkout as checkout_module
from orchestrator.pools import logoff, sessions
from orchestrator.pools.sessions import Checkout
from orchestrator.state import events


def register(commands, add_output) -> None:
    checkout = commands.add_parser(
        "checkout", help="give a user a desktop of a pool: a free one (floating) or the "
        "user's own (dedicated), made on demand if none is free")
    checkout.add_argument("inventory", type=Path)
    checkout.add_argument("pool")
    checkout.add_argument("--user", required=True, help="the user the session is for")
    add_output(checkout)
    checkout.set_defaults(handler=run_checkout)

    release = commands.add_parser(
        "release", help="end the session on a desktop and run its pool's logoff action "
        "(keep, refresh or delete) and power policy")
    release.add_argument("inventory", type=Path)
    release.add_argument("desktop")
    add_output(release)
    release.set_defaults(handler=run_release)

    assign = commands.add_parser("assign", help="assign a desktop of a dedicated pool to a "
                                 "user, or remove its assignment")
    assign.add_argument("inventory", type=Path)
    assign.add_argument("desktop")
    who = assign.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the user the desktop belongs to from now on")
    who.add_argument("--remove", action="store_true", help="remove the desktop's assignment")
    add_output(assign)
    assign.set_defaults(handler=run_assign)

    clear = commands.add_parser("clear", help="clear the provisioning error that stopped a "
                                "pool, so apply makes its desktops again")
    clear.add_argument("inventory", type=Path)
    clear.add_argument("pool")
    add_output(clear)
    clear.set_defaults(handler=run_clear)


@contextlib.contextmanager
def _pool_host(inventory: Inventory, pool: str) -> Iterator[HostContext]:
    ctx = open_inventory_host(inventory, sessions.pool_of(inventory, pool).host)
    try:
        yield ctx
    finally:
        ctx.close()


@contextlib.contextmanager
def _desktop_host(inventory: Inventory, desktop: str) -> Iterator[HostContext]:
    """Connect to the inventory's host that has ``desktop`` (the first host if none has)."""
    keys = sorted({pool.host for pool in inventory.pools.values()}) or sorted(inventory.hosts)
    for position, key in enumerate(keys):
        ctx = open_inventory_host(inventory, key)
        try:
            ctx.conn.lookupByName(desktop)
        except libvirt.libvirtError:
            if position < len(keys) - 1:
                ctx.close()
                continue
        try:
            yield ctx
        finally:
            ctx.close()
        return


def run_checkout(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    printer = output.EventPrinter(json_lines=False)
    quiet = args.output == "json"
    with _pool_host(inventory, args.pool) as ctx:
        result = checkout_module.checkout(inventory, ctx, args.pool, args.user,
                                          _silent if quiet else printer)
        data = describe_checkout(args.inventory, ctx, result)
    if quiet:
        output.print_json(data)
        return 0
    print(f"{data['user']} has desktop {data['desktop']} of pool {data['pool']} "
          f"since {data['since']}" + (" (made on demand)" if result.created else "")
          + (" (already checked out)" if result.again else ""))
    if data["ssh"]:
        print(f"  SSH:      {data['commands']['ssh']}   "
              f"({data['ssh']['address']}:{data['ssh']['port']}, user {data['ssh']['user']})")
    print(f"  console:  {data['commands']['console']}")
    print(f"  release:  {data['commands']['release']}")
    return 0


def describe_checkout(path: Path, ctx: HostContext, result: Checkout) -> dict:
    """Return the checkout as -o json prints it: the desktop, the session and how to reach
    it."""
    record, name = result.record, result.domain.name()
    ssh = None
    if record.ssh_port:
        ssh = {"address": "127.0.0.1", "port": record.ssh_port,
               "user": record.extra.get("login_user", "")}
    return {
        "desktop": name, "pool": record.pool, "user": record.session_user,
        "since": record.session_since, "assigned_to": record.assigned_to,
        "created": result.created, "started": result.started, "again": result.again,
        "ssh": ssh,
        "commands": {
            "ssh": f"labctl ssh {name} -i {path}",
            "console": f"virsh -c {ctx.settings.uri} console {name}",
            "release": f"labctl release {path} {name}",
        },
    }


def run_release(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    printer = output.EventPrinter(json_lines=False)
    quiet = args.output == "json"
    with _desktop_host(inventory, args.desktop) as ctx:
        result = logoff.release(inventory, ctx, args.desktop, _silent if quiet else printer)
    data = {"desktop": result.desktop, "pool": result.pool, "user": result.user,
            "logoff": result.action, "reason": result.reason}
    if quiet:
        output.print_json(data)
    else:
        print(f"{result.desktop}: session of {result.user} ended; logoff action "
              f"{result.action}" + (f" ({result.reason})" if result.reason else ""))
    return 0


def run_assign(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    user = None if args.remove else args.user
    if user is not None:
        sessions.check_user(user)
    with _desktop_host(inventory, args.desktop) as ctx:
        _domain, record = sessions.assign(inventory, ctx, args.desktop, user)
    if args.output == "json":
        output.print_json({"desktop": args.desktop, "pool": record.pool,
                           "assigned_to": record.assigned_to})
    elif user:
        print(f"{args.desktop} (pool {record.pool}) is assigned to {user}")
    else:
        print(f"{args.desktop} (pool {record.pool}) is no longer assigned")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    sessions.pool_of(inventory, args.pool)
    stopped = events.stopped_pools(inventory.name).get(args.pool)
    cleared = events.clear_pool(inventory.name, args.pool)
    if cleared:
        events.record(inventory.name, "clear", "provisioning error cleared", pool=args.pool)
    if args.output == "json":
        output.print_json({"pool": args.pool, "cleared": cleared,
                           "error": stopped.message if stopped else None})
    elif cleared:
        print(f"pool {args.pool}: provisioning error cleared; labctl apply {args.inventory} "
              "makes its desktops again")
    else:
        print(f"pool {args.pool} was not stopped; nothing to clear")
    return 0


def _silent(_desktop: str, _step: str, _status: str) -> None:
    pass

