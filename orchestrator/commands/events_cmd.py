"""labctl events: the recent lifecycle events of an inventory's desktops and pools."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from orchestrator import output
from orchestrator.errors import LabctlError
from orchestrator.inventory import load_inventory
from orchestrator.state import events


def register(commands, add_output) -> None:
    parser = commands.add_parser(
        "events", help="print recent lifecycle events (created, failed, deleted, refreshed, "
        "pool stopped...) of the inventory's desktops, oldest first")
    parser.add_argument("inventory", type=Path)
    parser.add_argument("--pool", help="only the events of this pool")
    parser.add_argument("--limit", type=_count, default=50, metavar="N",
                        help="print the newest N events (default 50)")
    add_output(parser)
    parser.set_defaults(handler=show_events)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count: {text!r}") from None
    if not 1 <= value <= events.KEEP_EVENTS:
        raise argparse.ArgumentTypeError(
            f"--limit must be from 1 to {events.KEEP_EVENTS} (the events kept), not {value}")
    return value


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def show_events(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    found = events.recent(inventory.name, limit=args.limit, pool=args.pool)
    if args.pool is not None and args.pool not in inventory.pools and not found:
        raise LabctlError(
            f"pool {args.pool} is not in inventory {inventory.name} and has no events",
            where=str(args.inventory),
            fix=f"use one of its pools: {', '.join(sorted(inventory.pools)) or 'none'}")
    if args.output == "json":
        output.print_json([{"time": _timestamp(event.time), "timestamp": event.time,
                            "pool": event.pool, "desktop": event.desktop, "kind": event.kind,
                            "message": event.message} for event in found])
        return 0
    rows = [(_timestamp(event.time), event.pool, event.desktop, event.kind, event.message)
            for event in found]
    output.print_table(f"events of inventory {inventory.name}",
                       ("time (UTC)", "pool", "desktop", "kind", "message"), rows)
    return 0
