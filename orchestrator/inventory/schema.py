"""The JSON Schema of inventory files, for editors (``labctl schema`` prints it).

It is generated from the same pydantic models the loader validates with, plus the
file-only keys ``vars``, ``include`` and ``defaults``. The loader checks more than the
schema expresses: references between sections, name clashes, time zones and SSH key
contents. A ``{{ variable }}`` in a value that the schema types as a number or a list
is a schema error in an editor, although labctl accepts it.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from orchestrator.inventory.fields import InventoryName, Key
from orchestrator.inventory.model import Host, ImageRef, Network, Pool, StrictModel

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class InventoryDocument(StrictModel):
    """A labctl inventory file: hosts, images and networks, and pools of desktops."""

    name: InventoryName | None = Field(None, description="Default: the file name without .yaml.")
    vars: dict[str, Any] = Field(
        {}, description="Jinja2 variables for {{ name }} in any string value, in order."
    )
    include: list[str] = Field(
        [], description="Other inventory files, relative to this one, merged at the top level."
    )
    defaults: dict[str, Any] = Field({}, description="Pool keys that every pool inherits.")
    hosts: dict[Key, Host] = Field(
        {}, description="libvirt hosts; without hosts:, one host local on qemu:///system."
    )
    images: dict[Key, ImageRef] = {}
    networks: dict[Key, Network] = {}
    pools: dict[Key, Pool] = {}


def inventory_json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of an inventory file."""
    schema = InventoryDocument.model_json_schema(mode="validation")
    definitions = schema["$defs"]
    pool_defaults = copy.deepcopy(definitions["Pool"])
    pool_defaults.pop("required", None)
    pool_defaults["title"] = "PoolDefaults"
    pool_defaults["description"] = "Pool keys inherited by every pool; mappings merge deeply."
    definitions["PoolDefaults"] = pool_defaults
    properties = schema["properties"]
    properties["defaults"] = {
        "$ref": "#/$defs/PoolDefaults",
        "description": properties["defaults"]["description"],
    }
    for section in ("hosts", "images", "networks", "pools"):
        # pydantic lists the key pattern as patternProperties; other keys must be rejected.
        properties[section]["additionalProperties"] = False
    return {"$schema": SCHEMA_DIALECT, **schema}
