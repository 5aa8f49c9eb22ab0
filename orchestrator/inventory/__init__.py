"""The inventory: a playbook-style YAML file of hosts, images, networks and pools of desktops.

``load_inventory`` reads and validates it (errors are InventoryError with FILE:LINE),
``expand_names`` lists a pool's desktop names and ``inventory_json_schema`` returns the
JSON Schema that editors can use.
"""

from orchestrator.inventory.loader import load_inventory
from orchestrator.inventory.model import (
    BridgeNetwork,
    Hardware,
    Host,
    Identity,
    ImageRef,
    InstantOptions,
    Inventory,
    LibvirtNetwork,
    Pool,
    StoragePool,
    User,
    UserNetwork,
)
from orchestrator.inventory.naming import expand_names
from orchestrator.inventory.schema import inventory_json_schema

__all__ = [
    "BridgeNetwork",
    "Hardware",
    "Host",
    "Identity",
    "ImageRef",
    "InstantOptions",
    "Inventory",
    "LibvirtNetwork",
    "Pool",
    "StoragePool",
    "User",
    "UserNetwork",
    "expand_names",
    "inventory_json_schema",
    "load_inventory",
]
