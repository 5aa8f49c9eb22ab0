"""labctl validate | schema: checking inventories without touching any host."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator import output
from orchestrator.inventory import expand_names, inventory_json_schema, load_inventory


def register(commands, add_output) -> None:
    validate = commands.add_parser("validate", help="check an inventory without touching a host")
    validate.add_argument("inventory", type=Path, help="inventory YAML file")
    validate.set_defaults(handler=validate_inventory)
    schema = commands.add_parser("schema", help="print the inventory's JSON Schema")
    schema.set_defaults(handler=print_schema)


def validate_inventory(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    total = sum(len(expand_names(pool)) for pool in inventory.pools.values())
    print(f"{args.inventory}: valid: inventory {inventory.name}, {len(inventory.pools)} pools, "
          f"{total} desktops")
    return 0


def print_schema(_args: argparse.Namespace) -> int:
    output.print_json(inventory_json_schema())
    return 0
