"""labctl identity list."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from orchestrator import output
from orchestrator.identity.registry import OPERATIONS


def register(commands, add_output) -> None:
    identity = commands.add_parser("identity", help="the identity operations clones get")
    sub = identity.add_subparsers(dest="identity_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", help="print the registry of identity operations")
    add_output(listing)
    listing.set_defaults(handler=list_operations)


def list_operations(args: argparse.Namespace) -> int:
    if args.output == "json":
        output.print_json([asdict(item) for item in OPERATIONS])
        return 0
    rows = [(item.name, "on" if item.default else "off", item.description,
             ", ".join(item.applied_by), item.detail) for item in OPERATIONS]
    output.print_table(None, ("operation", "default", "description", "applied by", "how"), rows)
    return 0
