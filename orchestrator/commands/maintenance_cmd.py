"""labctl recompose | rebalance: pool maintenance that re-creates or moves desktops."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator import locks, output, recovery
from orchestrator.inventory import load_inventory
from orchestrator.plan import make_plan
from orchestrator.rebalance import rebalance
from orchestrator.recompose import recompose


def register(commands, add_output) -> None:
    parser = commands.add_parser(
        "recompose", help="roll pools to the image version the inventory names now, keeping "
        "each desktop's identity (desktops in use wait for logoff, or the grace period)")
    parser.add_argument("inventory", type=Path)
    parser.add_argument("pools", nargs="*", metavar="POOL", help="pools (default: all)")
    parser.add_argument("--no-wait", action="store_true",
                        help="strategy force: do not wait for the grace period to end; desktops "
                        "in use are recomposed by a run after it")
    add_output(parser)
    parser.set_defaults(handler=run_recompose)

    parser = commands.add_parser(
        "rebalance", help="spread pools' desktops evenly over the storage pools their "
        "storage: lists")
    parser.add_argument("inventory", type=Path)
    parser.add_argument("pools", nargs="*", metavar="POOL", help="pools (default: all)")
    add_output(parser)
    parser.set_defaults(handler=run_rebalance)


def _run_locked(args: argparse.Namespace, work) -> dict:
    """Plan the inventory under its run lock and pass the plan to ``work``."""
    inventory = load_inventory(args.inventory)
    printer = output.EventPrinter(json_lines=args.output == "json")
    with locks.exclusive_run(f"inventory:{inventory.name}",
                             f"run on inventory {inventory.name}"):
        # A killed recompose or rebalance left journal operations: finish or roll them
        # back first, so the plan sees the desktops as they are after that.
        recovery.recover_inventory(inventory.name, printer)
        plan = make_plan(inventory, build_images=True,
                         progress=lambda message: printer("image", "build", message))
        try:
            return work(plan, printer)
        finally:
            plan.close()


def run_recompose(args: argparse.Namespace) -> int:
    def work(plan, printer):
        return recompose(plan, args.pools, printer, wait=not args.no_wait)

    result = _run_locked(args, work)
    summary = {"recomposed": sorted(result.recomposed), "waiting": sorted(result.waiting),
               "not_done": result.not_done, "up_to_date": sorted(result.up_to_date),
               "failed": {name: str(error) for name, error in result.failed.items()}}
    if args.output == "json":
        sys.stdout.write(json.dumps({"event": "result", **summary}) + "\n")
    else:
        for key in ("recomposed", "waiting", "not_done", "up_to_date"):
            print(f"{key.replace('_', ' '):<11} {', '.join(summary[key]) or '-'}")
        if result.waiting:
            print("Desktops in use are recomposed at their release (wait-for-logoff) or "
                  "after the pool's recompose.grace (force).")
    return _errors(result.failed)


def run_rebalance(args: argparse.Namespace) -> int:
    result = _run_locked(args, lambda plan, printer: rebalance(plan, args.pools, printer))
    if args.output == "json":
        sys.stdout.write(json.dumps({
            "event": "result",
            "moved": {name: {"from": a, "to": b} for name, (a, b) in result.moved.items()},
            "skipped": result.skipped, "spread": result.spread,
            "failed": {name: str(error) for name, error in result.failed.items()},
        }) + "\n")
    else:
        rows = [(name, source, target) for name, (source, target) in sorted(result.moved.items())]
        output.print_table("moved", ("desktop", "from", "to"), rows)
        for name, reason in sorted(result.skipped.items()):
            print(f"{name}: not moved: {reason}")
        for pool, spread in sorted(result.spread.items()):
            print(f"pool {pool}: " + ", ".join(f"{k} {v}" for k, v in spread.items()))
    return _errors(result.failed)


def _errors(failed: dict) -> int:
    for error in failed.values():
        print(f"labctl: error: {error}", file=sys.stderr)
    return 1 if failed else 0
