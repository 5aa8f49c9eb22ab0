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
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl, unique_name

from orchestrator.errors import LabctlError
from orchestrator.inventory import load_inventory
from orchestrator.pools import sessions, sizing
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
    assert names(layouts, "bad") == []
    assert "labctl clear" in layouts["bad"].held


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


@pytest.mark.parametrize("user", ["", "a b", "-x", "ann;rm", "x" * 65])
def test_user_name_invalid(user):
    with pytest.raises(LabctlError) as caught:
        sessions.check_user(user)
    assert caught.value.message == f"invalid user name {user!r}"
    assert "1 to 64 letters" in (caught.value.fix or "")


def test_user_name_valid():
    for user in ("ann", "j.doe", "ann@lab.test", "u_1"):
        sessions.check_user(user)


# --- on real hosts ---------------------------------------------------------------------------


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def pool_status(path: Path) -> dict[str, dict]:
    result = run_labctl("status", str(path), "-o", "json", timeout=60)
    assert result.returncode == 0, describe(result)
    return {group["name"]: group for group in json.loads(result.stdout)["pools"]}


def planned(path: Path) -> dict:
    result = run_labctl("plan", str(path), "-o", "json", timeout=60)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


@pytest.mark.libvirt
def test_provisioning_error_stops_pool(make_inventory):
    # The bridge does not exist, so libvirt fails to start each desktop: a provisioning
    # error in the start step, without booting anything. One provisioning at a time makes
    # the second desktop wait until the first one has failed.
    prefix = unique_name("e")
    name = unique_name("t")
    bad = {"image": "tiny", "clone": "linked", "size": 2, "naming": f"{prefix}{{n}}",
           "network": "nobridge", "hardware": {"memory": MEMORY}}
    hosts = {"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH},
                       "limits": {"provisioning": 1}}}
    path = make_inventory({"bad": bad}, name=name, hosts=hosts,
                          networks={"nobridge": {"mode": "bridge", "bridge": "labctlnobr9"}})
    try:
        first = run_labctl("apply", str(path), "-o", "json", timeout=APPLY_TIMEOUT)
        assert first.returncode == 1, describe(first)
        result = json.loads(first.stdout.splitlines()[-1])
        assert len(result["failed"]) == 1, f"only the first desktop may be tried: {result}"
        assert len(result["held"]) == 1, f"the second desktop must be held: {result}"
        error = pool_status(path)["bad"]["error"]
        assert error is not None, "status does not show the stopped pool"
        assert error["desktop"] in result["failed"], error
        assert error["time"], error
        table = run_labctl("status", str(path), timeout=60)
        assert "pool bad stopped at" in table.stdout, describe(table)
        assert f"labctl clear {path} bad" in table.stdout, describe(table)
        again = planned(path)
        assert [a for a in again["actions"] if a["action"] == "create"] == [], again
        assert "labctl clear" in again["held"]["bad"], again
        cleared = run_labctl("clear", str(path), "bad", timeout=60)
        assert cleared.returncode == 0, describe(cleared)
        assert "error cleared" in cleared.stdout, cleared.stdout
        assert pool_status(path)["bad"]["error"] is None, "clear left the error"
        creates = [a["desktop"] for a in planned(path)["actions"] if a["action"] == "create"]
        assert creates == [f"{prefix}1", f"{prefix}2"], creates
    finally:
        events.clear_pool(name, "bad")


@pytest.mark.libvirt
def test_refresh_over_plans_refresh(make_inventory):
    prefix = unique_name("o")
    spec_ = {"image": "tiny", "clone": "linked", "size": 1, "naming": f"{prefix}{{n}}",
             "network": "lab", "hardware": {"memory": MEMORY}, "refresh_over": "8MiB"}
    path = make_inventory({"lab": spec_})
    applied = run_labctl("apply", str(path), timeout=APPLY_TIMEOUT)
    assert applied.returncode == 0, describe(applied)
    name = f"{prefix}1"
    assert planned(path)["actions"][0]["action"] == "keep", "a fresh overlay is below 8MiB"
    written = run_labctl("ssh", name, "-i", str(path), "--",
                         "dd if=/dev/urandom of=/data/big bs=1M count=24 && sync", timeout=120)
    assert written.returncode == 0, describe(written)
    action = planned(path)["actions"][0]
    assert (action["action"], action["desktop"]) == ("refresh", name), action
    assert "over refresh_over (8 MiB)" in action["reason"], action
    refreshed = run_labctl("apply", str(path), timeout=APPLY_TIMEOUT)
    assert refreshed.returncode == 0, describe(refreshed)
    assert planned(path)["actions"][0]["action"] == "keep", "the refresh left a big overlay"
    left = run_labctl("ssh", name, "-i", str(path), "--", "test -e /data/big", timeout=60)
    assert left.returncode == 1, f"the refresh kept the file: {describe(left)}"
