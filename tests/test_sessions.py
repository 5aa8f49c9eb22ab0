"""labctl checkout, release and assign on real tiny guests (128 MiB, TCG).

Each test writes its own inventory with a unique name, so the pool locks, event rows
and desktops of parallel workers never meet. make_inventory destroys the desktops.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_labctl, unique_name

pytestmark = pytest.mark.libvirt

# Seconds one command may take with a few tiny guests booting under TCG on a loaded host.
COMMAND_TIMEOUT = 600
MEMORY = "128MiB"


def pool(prefix: str, size: int, **policies) -> dict:
    return {"image": "tiny", "clone": "linked", "size": size, "naming": f"{prefix}{{n}}",
            "network": "lab", "hardware": {"memory": MEMORY}, **policies}


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def ok(*args: str) -> subprocess.CompletedProcess:
    result = run_labctl(*args, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, f"labctl {' '.join(args)} failed: {describe(result)}"
    return result


def checkout(path: Path, pool_key: str, user: str) -> dict:
    result = ok("checkout", str(path), pool_key, "--user", user, "-o", "json")
    return json.loads(result.stdout)


def desktops(path: Path) -> dict[str, dict]:
    data = json.loads(ok("status", str(path), "-o", "json").stdout)
    return {d["name"]: d for group in data["pools"] for d in group["desktops"]}


def creates(path: Path) -> list[str]:
    actions = json.loads(ok("plan", str(path), "-o", "json").stdout)["actions"]
    return sorted(a["desktop"] for a in actions if a["action"] == "create")


def guest(path: Path, desktop: str, command: str) -> subprocess.CompletedProcess:
    return run_labctl("ssh", desktop, "-i", str(path), "--", command, timeout=60)


def test_spares_refilled_after_checkout(make_inventory):
    prefix = unique_name("s")
    policy = {"mode": "on-demand", "min": 0, "spare": 2}
    path = make_inventory({"lab": pool(prefix, 3, provisioning=policy, power="suspend")})
    ok("apply", str(path))
    first = desktops(path)
    assert sorted(first) == [f"{prefix}1", f"{prefix}2"], "0 in use + 2 spares"
    for name, desktop in first.items():
        assert desktop["state"] == "saved", f"{name}: power suspend left it {desktop['state']}"
    # Two checkouts at once must get different desktops.
    with ThreadPoolExecutor(max_workers=2) as executor:
        got = list(executor.map(lambda user: checkout(path, "lab", user), ["ann", "bob"]))
    assert {got[0]["desktop"], got[1]["desktop"]} == set(first), f"checkouts got {got}"
    assert all(item["started"] for item in got), f"saved desktops were not started: {got}"
    after = desktops(path)
    for item in got:
        desktop = after[item["desktop"]]
        assert desktop["state"] == "running", f"{item['desktop']} is {desktop['state']}"
        assert desktop["session"]["user"] == item["user"], desktop["session"]
    assert creates(path) == [f"{prefix}3"], "2 in use + 2 spares, but size is 3"
    ok("apply", str(path))
    assert sorted(desktops(path)) == [f"{prefix}{n}" for n in (1, 2, 3)]
    assert creates(path) == [], "the pool is at its size"
    assert checkout(path, "lab", "cat")["desktop"] == f"{prefix}3"
    beyond = run_labctl("checkout", str(path), "lab", "--user", "dan", timeout=COMMAND_TIMEOUT)
    assert beyond.returncode == 1, describe(beyond)
    assert "pool lab has no free desktop: all 3 of its desktops (size 3)" in beyond.stderr
    assert "raise size:" in beyond.stderr, beyond.stderr


def test_checkout_grows_pool(make_inventory):
    prefix = unique_name("g")
    policy = {"mode": "on-demand", "min": 0, "spare": 0}
    path = make_inventory({"lab": pool(prefix, 1, provisioning=policy)})
    ok("apply", str(path))
    assert desktops(path) == {}, "min 0 and spare 0 make no desktop up front"
    got = checkout(path, "lab", "ann")
    assert got["desktop"] == f"{prefix}1", got
    assert got["created"], f"checkout did not make the desktop: {got}"
    assert got["ssh"]["port"] > 0, got
    assert got["commands"]["ssh"] == f"labctl ssh {prefix}1 -i {path}", got
    assert guest(path, got["desktop"], "true").returncode == 0, "the new desktop is not ready"
    again = checkout(path, "lab", "ann")
    assert again["desktop"] == got["desktop"], again
    assert again["again"], f"a second checkout of the same user is not marked: {again}"
    beyond = run_labctl("checkout", str(path), "lab", "--user", "bob", timeout=COMMAND_TIMEOUT)
    assert beyond.returncode == 1, describe(beyond)
    assert "has no free desktop" in beyond.stderr, beyond.stderr


def test_floating_refresh_on_release(make_inventory):
    prefix = unique_name("r")
    path = make_inventory({"lab": pool(prefix, 1, logoff="refresh")})
    ok("apply", str(path))
    name = checkout(path, "lab", "ann")["desktop"]
    before = desktops(path)[name]
    written = guest(path, name, "touch /data/session-file && sync")
    assert written.returncode == 0, describe(written)
    released = json.loads(ok("release", str(path), name, "-o", "json").stdout)
    assert released == {"desktop": name, "pool": "lab", "user": "ann", "logoff": "refresh",
                        "reason": ""}
    after = desktops(path)[name]
    for key in ("uuid", "mac", "hostname"):
        assert after[key] == before[key], f"{key} changed: {before[key]} -> {after[key]}"
    assert after["generation"] == before["generation"] + 1, "the desktop was not re-created"
    assert after["session"] is None, f"the session survived the release: {after['session']}"
    left = guest(path, name, "test -e /data/session-file")
    assert left.returncode == 1, f"the file written before release is still there: {left}"
    twice = run_labctl("release", str(path), name, timeout=COMMAND_TIMEOUT)
    assert twice.returncode == 1, describe(twice)
    assert "has no session to release" in twice.stderr, twice.stderr


def test_dedicated_refresh_keeps_user(make_inventory):
    prefix, manual = unique_name("d"), unique_name("m")
    dedicated = {"type": "dedicated"}
    on_demand = {"mode": "on-demand", "min": 0, "spare": 0}
    path = make_inventory({
        "own": pool(prefix, 1, assignment=dedicated, logoff="refresh", power="power-off"),
        "manual": pool(manual, 1, assignment=dedicated | {"automatic": False},
                       provisioning=on_demand),
    })
    ok("apply", str(path))
    name = f"{prefix}1"
    assert desktops(path)[name]["state"] == "shut off", "power-off keeps free desktops off"
    got = checkout(path, "own", "ann")
    assert (got["desktop"], got["assigned_to"], got["started"]) == (name, "ann", True), got
    ok("release", str(path), name)
    after = desktops(path)[name]
    assert after["assigned_to"] == "ann", "the refresh lost the assignment"
    assert after["session"] is None, after
    assert after["state"] == "shut off", "power-off did not shut the refreshed desktop down"
    other = run_labctl("checkout", str(path), "own", "--user", "bob", timeout=COMMAND_TIMEOUT)
    assert other.returncode == 1, describe(other)
    assert "has no free desktop" in other.stderr, other.stderr
    back = checkout(path, "own", "ann")
    assert back["desktop"] == name, back
    assert back["started"], f"checkout did not start the shut-off desktop: {back}"
    taken = run_labctl("assign", str(path), name, "--user", "bob", timeout=COMMAND_TIMEOUT)
    assert taken.returncode == 1, describe(taken)
    assert f"{name} is in use by ann" in taken.stderr, taken.stderr
    refused = run_labctl("checkout", str(path), "manual", "--user", "ann",
                         timeout=COMMAND_TIMEOUT)
    assert refused.returncode == 1, describe(refused)
    assert f"labctl assign {path} DESKTOP --user ann" in refused.stderr, refused.stderr
