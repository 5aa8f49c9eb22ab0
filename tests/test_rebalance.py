"""labctl rebalance on real tiny guests, and the placement arithmetic it relies on.

The second storage pool is a directory pool under /var/lib/labctl with a unique name.
The full one is a 1 MiB tmpfs mounted inside libvirtd's mount namespace (scripts/host-setup
starts libvirtd in its own), so libvirt reports its real free space. Both are removed at
the end, after the inventory's desktops.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl, unique_name
from test_apply_tiny import (
    APPLY_TIMEOUT, DEFAULTS, apply_ok, describe_run, guest_output, plan_actions, pool,
    status_desktops,
)

from orchestrator.errors import GuestTimeout
from orchestrator.inventory import load_inventory
from orchestrator.plan import make_plan
from orchestrator.rebalance import Move, plan_moves, rebalance
from orchestrator.storage import move

LIBVIRTD_PID = Path("/run/libvirtd.pid")


# Placement arithmetic (no libvirt).


def test_plan_moves_spreads_evenly_with_few_moves():
    current = {"d1": "a", "d2": "a", "d3": "a", "d4": "a", "d5": "b"}
    moves = plan_moves(current, ["a", "b", "c"])
    after = dict(current) | {m.desktop: m.target for m in moves}
    counts = sorted(list(after.values()).count(name) for name in "abc")
    assert counts == [1, 2, 2], f"uneven spread {after} from moves {moves}"
    assert len(moves) == 2, f"more moves than needed: {moves}"


def test_plan_moves_empties_unlisted_pool_and_keeps_pinned():
    current = {"d1": "old", "d2": "old", "d3": "a"}
    moves = plan_moves(current, ["a", "b"], pinned={"d2"})
    assert Move("d1", "old", "b") in moves, moves
    assert all(m.desktop != "d2" for m in moves), f"a desktop in use moved: {moves}"


def test_plan_moves_nothing_when_balanced():
    assert plan_moves({"d1": "a", "d2": "b", "d3": "a"}, ["a", "b"]) == []


# A real rebalance.


def remove_storage_pool(conn: libvirt.virConnect, name: str, path: str) -> None:
    """Stop, empty and undefine a storage pool this test made."""
    with contextlib.suppress(libvirt.libvirtError):
        storage = conn.storagePoolLookupByName(name)
        if storage.isActive():
            storage.refresh(0)
            for volume in storage.listAllVolumes(0):
                volume.delete(0)
            storage.destroy()
        storage.undefine()
    with contextlib.suppress(OSError):
        os.rmdir(path)


@pytest.fixture
def spare_storage(conn):
    """Two storage pool names and directories: a plain one and a 1 MiB tmpfs."""
    plain = unique_name("rbs")
    small = unique_name("rbf")
    plain_path, small_path = f"/var/lib/labctl/{plain}", f"/var/lib/labctl/{small}"
    os.makedirs(small_path)
    libvirtd = LIBVIRTD_PID.read_text().strip()
    subprocess.run(["nsenter", "-t", libvirtd, "-m", "mount", "-t", "tmpfs", "-o",
                    "size=1m,mode=0711", "tmpfs", small_path], check=True)
    try:
        yield {plain: plain_path, small: small_path}
    finally:
        remove_storage_pool(conn, plain, plain_path)
        remove_storage_pool(conn, small, small_path)
        subprocess.run(["nsenter", "-t", libvirtd, "-m", "umount", small_path], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(small_path)


def set_storage(path: Path, storage: list[str]) -> None:
    document = yaml.safe_load(path.read_text())
    for spec in document["pools"].values():
        spec["storage"] = storage
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def chain_of(disk: str) -> list[dict]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", disk],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_rebalance_spreads_linked_pool_over_two_storage_pools(spare_storage, make_inventory):
    plain, small = list(spare_storage)
    prefix = unique_name("rb")
    names = [f"{prefix}{n}" for n in range(1, 5)]
    hosts = {"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH},
                       "storage_pools": [{"pool": name, "path": path}
                                         for name, path in spare_storage.items()]}}
    spec = pool(prefix, 4) | {"storage": [TEST_POOL]}
    path = make_inventory({"lab": spec}, hosts=hosts, defaults=DEFAULTS)
    apply_ok(path)
    before = status_desktops(path)
    assert {os.path.dirname(before[n]["disk"]["path"]) for n in names} == {TEST_POOL_PATH}

    set_storage(path, [TEST_POOL, plain])
    assert {a["action"] for a in plan_actions(path)} == {"keep"}, "listing a pool changed plan"
    result = run_labctl("rebalance", "-o", "json", str(path), timeout=APPLY_TIMEOUT)
    assert result.returncode == 0, describe_run(result)
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["spread"]["lab"] == {TEST_POOL: 2, plain: 2}, summary
    after = status_desktops(path)
    where = {n: os.path.dirname(after[n]["disk"]["path"]) for n in names}
    assert sorted(where.values()).count(spare_storage[plain]) == 2, where
    for name in names:
        disk = after[name]["disk"]["path"]
        chain = chain_of(disk)
        replica = f"{where[name]}/labctl-replica-{after[name]['image'].split('@')[1]}.qcow2"
        assert [layer["filename"] for layer in chain] == [disk, replica], (
            f"{name}: chain {[layer['filename'] for layer in chain]}")
        assert chain[0]["backing-filename-format"] == "qcow2", f"{name}: no backing format"
        check = subprocess.run(["qemu-img", "check", "-U", disk], capture_output=True,
                               text=True)
        assert check.returncode == 0, f"{name}: qemu-img check: {check.stdout}{check.stderr}"
        for key in ("uuid", "mac", "machine_id"):
            assert after[name][key] == before[name][key], f"{name}: {key} changed"
        assert after[name]["state"] == "running", f"{name} is {after[name]['state']}"
        hostname = guest_output(path, name, "hostname")
        assert hostname.stdout.strip() == name, f"{name}: {describe_run(hostname)}"
    moved = [n for n in names if where[n] != TEST_POOL_PATH]
    for name in moved:
        old = Path(TEST_POOL_PATH) / f"labctl-{name}-os.qcow2"
        assert not old.exists(), f"{name}: its old overlay {old} stayed"
    assert {a["action"] for a in plan_actions(path)} == {"keep"}, "rebalance left drift"

    # A storage pool without room: the move fails before anything changes.
    set_storage(path, [TEST_POOL, plain, small])
    full = run_labctl("rebalance", str(path), timeout=APPLY_TIMEOUT)
    assert full.returncode == 1, describe_run(full)
    assert f"storage pool {small} has" in full.stderr, f"no target named: {full.stderr}"
    assert "bytes free" in full.stderr, f"no free bytes given: {full.stderr}"
    assert "needs" in full.stderr, f"no needed bytes given: {full.stderr}"
    victim = next(n for n in names if f"desktop {n}" in full.stderr)
    unmoved = status_desktops(path)[victim]
    assert unmoved["disk"]["path"] == after[victim]["disk"]["path"], "the failed move moved"
    assert unmoved["state"] == "running", f"{victim} was left {unmoved['state']}"


def test_rebalance_failed_start_restores_old_disk(spare_storage, make_inventory, monkeypatch):
    plain = list(spare_storage)[0]
    prefix = unique_name("rb")
    name = f"{prefix}1"
    hosts = {"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH},
                       "storage_pools": [{"pool": plain, "path": spare_storage[plain]}]}}
    path = make_inventory({"lab": pool(prefix, 1) | {"storage": [TEST_POOL]}}, hosts=hosts,
                          defaults=DEFAULTS)
    apply_ok(path)
    before = status_desktops(path)[name]
    set_storage(path, [plain])

    def not_ready(domain, *_args, **_kwargs):
        raise GuestTimeout("made to time out", where=domain.name())

    monkeypatch.setattr(move, "wait_ready_again", not_ready)
    plan = make_plan(load_inventory(path))
    try:
        result = rebalance(plan, [], lambda *_: None)
    finally:
        plan.close()
    assert list(result.failed) == [name], result
    assert "made to time out" in str(result.failed[name]), result.failed[name]
    after = status_desktops(path)[name]
    assert after["disk"]["path"] == before["disk"]["path"], "the desktop stayed on the copy"
    assert os.path.exists(before["disk"]["path"]), "the old disk was deleted"
    copy = Path(spare_storage[plain]) / f"labctl-{name}-os.qcow2"
    assert not copy.exists(), f"the copy {copy} stayed"
    assert after["state"] == "running", f"{name} was left {after['state']}"
    hostname = ssh_hostname(path, name)
    assert hostname.stdout.strip() == name, describe_run(hostname)


def ssh_hostname(path: Path, name: str) -> subprocess.CompletedProcess:
    """Read the guest's hostname over SSH, retrying while sshd in a fresh boot starts."""
    for _attempt in range(3):
        try:
            result = guest_output(path, name, "hostname")
        except subprocess.TimeoutExpired:
            continue
        if result.returncode == 0:
            return result
    return guest_output(path, name, "hostname")
