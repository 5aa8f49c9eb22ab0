"""Pool sizing, naming across pools, stop-on-error and refresh_over.

The sizing and naming tests compute layouts from an inventory and made-up desktop
records, without a host. The others apply real tiny guests (128 MiB, TCG) through the
CLI, or in the stop-on-error test none at all: its desktops fail when libvirt starts
them, because their bridge does not exist.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import run_labctl, unique_name

from orchestrator.inventory import load_inventory
from orchestrator.pools import sizing
from orchestrator.state import events
from orchestrator.state.metadata import DesktopRecord

APPLY_TIMEOUT = 600
SSH_TIMEOUT = 60
MEMORY = "128MiB"


def inventory_of(tmp_path: Path, pools: dict):
    document = {"name": unique_name("u"), "images": {"tiny": {"build": "tiny"}},
                "pools": pools}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_inventory(path)


def spec(naming: str, size: int, **policies) -> dict:
    return {"image": "tiny", "clone": "linked", "size": size, "naming": naming, **policies}


def record(pool: str, index: int, *, session: str = "", assigned: str = "") -> DesktopRecord:
    return DesktopRecord(inventory="x", pool=pool, index=index, clone="linked", image="tiny@1",
                         host="local", hostname="", fqdn="", machine_id="", mac="", disk="",
                         state="ready", session_user=session, assigned_to=assigned)


def names(layouts: dict[str, sizing.PoolLayout], pool: str) -> list[str]:
    return [member.name for member in layouts[pool].desktops]


def new_names(layouts: dict[str, sizing.PoolLayout], pool: str) -> list[str]:
    return [member.name for member in layouts[pool].desktops if member.record is None]


ON_DEMAND = {"mode": "on-demand", "min": 1, "spare": 2}


# --- sizing and naming, without a host ------------------------------------------------------


def test_up_front_makes_size(tmp_path):
    inventory = inventory_of(tmp_path, {"lab": spec("pc{n}", 3)})
    layouts = sizing.layout(inventory, {}, set())
    assert names(layouts, "lab") == ["pc1", "pc2", "pc3"]


def test_on_demand_min_and_spares(tmp_path):
    inventory = inventory_of(tmp_path, {"lab": spec("pc{n}", 5, provisioning=ON_DEMAND)})
    empty = sizing.layout(inventory, {}, set())
    assert names(empty, "lab") == ["pc1", "pc2"], "max(min 1, 0 in use + 2 spares) is 2"
    busy = {"pc1": record("lab", 1, session="ann"), "pc2": record("lab", 2, session="bob")}
    layouts = sizing.layout(inventory, busy, set())
    assert new_names(layouts, "lab") == ["pc3", "pc4"], "2 in use need 2 new spares"


def test_on_demand_capped_at_size(tmp_path):
    inventory = inventory_of(tmp_path, {"lab": spec("pc{n}", 3, provisioning=ON_DEMAND)})
    busy = {f"pc{n}": record("lab", n, session=f"u{n}") for n in (1, 2)}
    layouts = sizing.layout(inventory, busy, set())
    assert new_names(layouts, "lab") == ["pc3"], "size 3 allows only one more"
    grown = sizing.layout(inventory, busy | {"pc3": record("lab", 3)}, set(), {"lab": 1})
    assert new_names(grown, "lab") == [], "a checkout cannot grow a pool past its size"


def test_on_demand_grow_by_one(tmp_path):
    policy = {"mode": "on-demand", "min": 0, "spare": 0}
    inventory = inventory_of(tmp_path, {"lab": spec("pc{n}", 3, provisioning=policy)})
    assert names(sizing.layout(inventory, {}, set()), "lab") == []
    assert new_names(sizing.layout(inventory, {}, set(), {"lab": 1}), "lab") == ["pc1"]


def test_shrink_removes_free_only(tmp_path):
    inventory = inventory_of(tmp_path, {"lab": spec("pc{n}", 1, provisioning=ON_DEMAND
                                                    | {"min": 1, "spare": 0})})
    existing = {"pc1": record("lab", 1), "pc2": record("lab", 2, session="ann"),
                "pc3": record("lab", 3, assigned="bob"), "pc4": record("lab", 4)}
    layouts = sizing.layout(inventory, existing, set())
    assert sorted(layouts["lab"].surplus) == ["pc1", "pc4"], layouts["lab"].surplus
    assert names(layouts, "lab") == ["pc2", "pc3"], "desktops in use or assigned stay"


def test_disabled_and_stopped_make_nothing(tmp_path):
    inventory = inventory_of(tmp_path, {
        "off": spec("off{n}", 2, provisioning={"enabled": False}),
        "bad": spec("bad{n}", 2),
    })
    layouts = sizing.layout(inventory, {"off1": record("off", 1)}, {"bad"})
    assert names(layouts, "off") == ["off1"], "an existing desktop stays"
    assert "disabled" in layouts["off"].held
    assert names(layouts, "bad") == [] and "labctl clear" in layouts["bad"].held


def test_shared_pattern_lowest_free(tmp_path):
    inventory = inventory_of(tmp_path, {"a": spec("lab-{n}", 2), "b": spec("lab-{n}", 3)})
    existing = {"lab-1": record("b", 1), "lab-3": record("a", 3)}
    layouts = sizing.layout(inventory, existing, set())
    assert names(layouts, "a") == ["lab-2", "lab-3"], "a keeps lab-3 and takes lab-2"
    assert names(layouts, "b") == ["lab-1", "lab-4", "lab-5"], "b keeps lab-1"
    everyone = names(layouts, "a") + names(layouts, "b")
    assert len(set(everyone)) == len(everyone), f"a name is given twice: {everyone}"


def test_names_list_takes_unused(tmp_path):
    pools = {"lab": {"image": "tiny", "clone": "linked", "names": ["x", "y", "z"],
                     "provisioning": {"mode": "on-demand", "spare": 1}}}
    inventory = inventory_of(tmp_path, pools)
    layouts = sizing.layout(inventory, {"x": record("lab", 1, session="ann")}, set())
    assert names(layouts, "lab") == ["x", "y"]
