"""labctl gc [INVENTORY] [--dry-run]: remove leftovers labctl can prove are its own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator import gc, journal, locks, output, recovery
from orchestrator.errors import ConflictError
from orchestrator.inventory import load_inventory
from orchestrator.recovery import Hosts, Leftover


def register(commands, add_output) -> None:
    parser = commands.add_parser(
        "gc", help="list and remove what interrupted runs left (domains, volumes, RAM files, "
        "save images, FIFOs) that labctl can prove it made; nothing else")
    parser.add_argument("inventory", type=Path, nargs="?",
                        help="inventory file (default: every inventory in labctl's journal)")
    parser.add_argument("--dry-run", "-n", action="store_true",
                        help="only list the leftovers")
    add_output(parser)
    parser.set_defaults(handler=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    printer = output.EventPrinter(json_lines=args.output == "json")
    if args.inventory is not None:
        inventory = load_inventory(args.inventory)
        places = [(host.uri, host.storage.pool) for host in inventory.hosts.values()]
        names = [inventory.name]
    else:
        places = []
        names = sorted({operation.inventory for operation in journal.operations()})
    rows: list[tuple[str, Leftover]] = []
    errors: list[str] = []
    skipped: list[str] = []
    for name in names:
        try:
            with locks.exclusive_run(f"inventory:{name}", f"run on inventory {name}"):
                found, failed = _collect(name, places, printer, dry_run=args.dry_run)
        except ConflictError as exc:
            if args.inventory is not None:
                raise
            skipped.append(f"inventory {name}: skipped, {exc.message}")
            continue
        rows += [(name, leftover) for leftover in found]
        errors += failed
    _show(args, rows, skipped)
    for error in errors:
        print(f"labctl: error: {error}", file=sys.stderr)
    return 1 if errors else 0


def _collect(inventory: str, places: list[tuple[str, str]], printer, *,
             dry_run: bool) -> tuple[list[Leftover], list[str]]:
    hosts = Hosts()
    try:
        sweep = gc.find(inventory, hosts, places)
        errors = [] if dry_run else recovery.perform(sweep, printer)
        return sweep.leftovers, errors
    finally:
        hosts.close()


def _show(args: argparse.Namespace, rows: list[tuple[str, Leftover]], skipped: list[str]) -> None:
    done = "would remove" if args.dry_run else "removed"
    if args.output == "json":
        output.print_json({"dry_run": args.dry_run, "skipped": skipped, "leftovers": [
            {"inventory": inventory, "kind": item.kind, "name": item.name, "host": item.host,
             "action": item.action, "reason": item.reason, "journal_operation": item.operation}
            for inventory, item in rows]})
        return
    for line in skipped:
        print(line)
    if not rows:
        print("No leftovers found.")
        return
    verb = {"remove": done, "define as failed": ("would define" if args.dry_run
                                                  else "defined") + " as failed"}
    output.print_table(
        "leftovers" + (" (dry run)" if args.dry_run else ""),
        ("inventory", "kind", "name", "host", "action", "reason"),
        [(inventory, item.kind, item.name, item.host, verb.get(item.action, item.action),
          item.reason) for inventory, item in rows])
