"""labctl run: the controller that keeps an inventory's pools at their policies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator import output
from orchestrator.controller import DEFAULT_INTERVAL, Controller, PassReport


def register(commands, add_output) -> None:
    run = commands.add_parser(
        "run", help="keep the inventory's pools at their policies: plan and apply again and "
        "again until SIGTERM or Ctrl-C")
    run.add_argument("inventory", type=Path)
    run.add_argument("--interval", type=_seconds, default=DEFAULT_INTERVAL, metavar="SECONDS",
                     help="seconds to wait between the end of a pass and the start of the "
                     f"next (default {DEFAULT_INTERVAL:.0f})")
    run.add_argument("--once", action="store_true",
                     help="run one pass and exit: 1 if a desktop failed, else 0")
    add_output(run)
    run.set_defaults(handler=run_controller)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is outside 0.1 to 86400 seconds")
    return value


def run_controller(args: argparse.Namespace) -> int:
    json_lines = args.output == "json"
    printer = output.EventPrinter(json_lines=json_lines)

    def report(result: PassReport) -> None:
        _print_report(result, json_lines)

    controller = Controller(args.inventory, printer, report, interval=args.interval)
    return controller.run(once=args.once)


def _print_report(report: PassReport, json_lines: bool) -> None:
    if json_lines:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
        sys.stdout.flush()
        return
    data = report.to_json()
    counts = ", ".join(f"{len(data[key])} {key}" for key in ("created", "updated", "deleted",
                                                               "failed", "held"))
    if report.skipped:
        print(f"pass {report.number} skipped: {report.skipped}", flush=True)
        return
    print(f"pass {report.number}: {counts}", flush=True)
    for pool in report.stopped_pools:
        print(f"  pool {pool} is stopped on error; labctl clear resumes it", flush=True)
    for desktop, reason in sorted(report.held.items()):
        print(f"  {desktop}: held, {reason}", flush=True)
    for desktop, message in sorted(data["failed"].items()):
        print(f"labctl: error: {message}", file=sys.stderr, flush=True)
    if report.error:
        print(f"labctl: error: {report.error}", file=sys.stderr, flush=True)
