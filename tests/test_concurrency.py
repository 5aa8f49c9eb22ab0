"""Concurrent labctl runs: two applies of one inventory, and two inventories side by side.

One inventory is applied by one labctl at a time: a second apply started with the first
exits at once with an error naming the first, and the host ends up with exactly the
inventory's desktops. Two inventories with the same pool names and image, applied at
once on one storage pool, share the replica, and destroying one leaves the other's
desktops, replica and instant-clone parent in place and working.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest
from conftest import REPO, TEST_POOL_PATH, run_labctl, unique_name
from faultkit import PrivatePool

from orchestrator.errors import ConflictError
from orchestrator.identity import allocate
from orchestrator.identity.allocate import HostAllocator
from orchestrator.identity.reservations import Reservations
from orchestrator.instant import parent
from orchestrator.state import metadata
from orchestrator.storage.replica import PREFIX as REPLICA_PREFIX

pytestmark = pytest.mark.libvirt

COMMAND_TIMEOUT = 900


def tiny_pool(prefix: str, clone: str = "linked", size: int = 1, **extra) -> dict:
    return {"image": "tiny", "clone": clone, "size": size, "naming": f"{prefix}{{n}}",
            "network": "lab", "hardware": {"memory": "128MiB"}, **extra}


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def run_together(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """Start one labctl per argv at the same moment and return their results in order."""
    processes = [subprocess.Popen([sys.executable, "-m", "orchestrator", *argv], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for argv in argvs]
    results = []
    try:
        for argv, process in zip(argvs, processes):
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
            results.append(subprocess.CompletedProcess(argv, process.returncode, stdout,
                                                       stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                # SIGTERM: labctl rolls back the desktops it was provisioning.
                process.terminate()
                process.wait(timeout=300)
    return results


def desktops_of(conn: libvirt.virConnect, inventory: str) -> dict[str, metadata.DesktopRecord]:
    return {name: record for name, (_domain, record)
            in metadata.inventory_desktops(conn, inventory).items()}


def assert_distinct_identities(conn: libvirt.virConnect, names: list[str]) -> None:
    """Assert that the domains ``names`` have pairwise distinct MACs, UUIDs and SSH ports."""
    domains = [conn.lookupByName(name) for name in names]
    records = [metadata.read(domain) for domain in domains]
    macs = [record.mac for record in records if record is not None]
    ports = [record.ssh_port for record in records if record is not None]
    uuids = [domain.UUIDString() for domain in domains]
    assert len(macs) == len(names), f"desktops without labctl metadata among {names}"
    assert len(set(macs)) == len(macs), f"duplicate MACs: {dict(zip(names, macs))}"
    assert len(set(uuids)) == len(uuids), f"duplicate UUIDs: {dict(zip(names, uuids))}"
    assert len(set(ports)) == len(ports), f"duplicate SSH ports: {dict(zip(names, ports))}"


def status(path: Path) -> dict:
    result = run_labctl("status", str(path), "-o", "json", timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def guest_hostname(path: Path, name: str) -> str:
    """Log in to ``name`` over SSH with labctl's host key check and return its hostname."""
    result = run_labctl("ssh", name, "--inventory", str(path), "--", "hostname",
                        timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, f"labctl ssh {name}: {describe(result)}"
    return result.stdout.strip()


# Two applies of one inventory.


def test_second_apply_rejected(make_inventory, conn):
    prefix = unique_name("cc")
    names = [f"{prefix}{n}" for n in (1, 2)]
    path = make_inventory({"lab": tiny_pool(prefix, size=2)})
    inventory = path.stem.rsplit("-", 1)[0]
    first, second = run_together(["apply", str(path)], ["apply", str(path)])

    succeeded = [result for result in (first, second) if result.returncode == 0]
    rejected = [result for result in (first, second) if result.returncode != 0]
    report = f"first: {describe(first)}\nsecond: {describe(second)}"
    assert len(succeeded) == 1, f"expected one apply to succeed: {report}"
    assert len(rejected) == 1, f"expected one apply to be rejected: {report}"
    lines = rejected[0].stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line: {report}"
    print(lines[0])  # shown by pytest -rP
    assert re.fullmatch(
        rf"labctl: error: another labctl apply of inventory {inventory} is running "
        rf"\(pid \d+\) \(wait for it to finish .*\)", lines[0]), lines[0]
    assert rejected[0].stdout == "", f"the rejected apply printed a plan or table: {report}"

    desktops = desktops_of(conn, inventory)
    assert sorted(desktops) == names, f"desktops of {inventory}: {sorted(desktops)}"
    for name, record in desktops.items():
        assert record.state == "ready", f"{name} is {record.state}"
    others = sorted(d.name() for d in conn.listAllDomains(0)
                    if d.name().startswith(prefix) and d.name() not in names)
    assert others == [], f"domains with the pool's prefix but not in the inventory: {others}"
    assert_distinct_identities(conn, names)
    volumes = sorted(f for f in os.listdir(TEST_POOL_PATH) if f"-{prefix}" in f)
    expected = sorted(f"labctl-{name}-{part}" for name in names
                      for part in ("os.qcow2", "seed.iso"))
    assert volumes == expected, f"volumes of the pool: {volumes}"


# Two inventories side by side.


@pytest.fixture
def shared_pool(tmp_path, conn):
    """A storage pool of this test only, so that no other test uses its replica."""
    pool = PrivatePool(Path("/var/lib/labctl") / unique_name("labctl-conc-"), tmp_path)
    yield pool
    problems = pool.close()
    assert not problems, problems


def side_by_side_pools(prefix: str) -> dict:
    return {"lab": tiny_pool(f"{prefix}l"),
            "kids": tiny_pool(f"{prefix}k", "instant", instant={"method": "fork"})}


def parents_of(conn: libvirt.virConnect, inventory: str) -> dict[str, parent.ParentRecord]:
    return {domain.name(): record for domain, record in parent.inventory_parents(conn, inventory)}


def test_inventories_side_by_side(shared_pool, conn):
    prefix_a, prefix_b = unique_name("sa"), unique_name("sb")
    path_a = shared_pool.inventory(side_by_side_pools(prefix_a))
    path_b = shared_pool.inventory(side_by_side_pools(prefix_b))
    names_a = [f"{prefix_a}l1", f"{prefix_a}k1"]
    names_b = [f"{prefix_b}l1", f"{prefix_b}k1"]
    result_a, result_b = run_together(["apply", str(path_a)], ["apply", str(path_b)])
    assert result_a.returncode == 0, f"apply of A: {describe(result_a)}"
    assert result_b.returncode == 0, f"apply of B: {describe(result_b)}"
    inventory_a, inventory_b = path_a.stem, path_b.stem
    assert sorted(desktops_of(conn, inventory_a)) == sorted(names_a)
    assert sorted(desktops_of(conn, inventory_b)) == sorted(names_b)
    assert_distinct_identities(conn, names_a + names_b)
    replicas = [f for f in shared_pool.files() if f.startswith(REPLICA_PREFIX)]
    assert any(f.endswith(".complete") for f in replicas), f"no replica: {shared_pool.files()}"
    parents_b = parents_of(conn, inventory_b)
    assert len(parents_b) == 1, f"parents of B: {sorted(parents_b)}"
    assert len(parents_of(conn, inventory_a)) == 1, "A has no parent of its own"

    destroyed = run_labctl("destroy", str(path_a), timeout=COMMAND_TIMEOUT)
    assert destroyed.returncode == 0, f"destroy of A: {describe(destroyed)}"

    assert desktops_of(conn, inventory_a) == {}, "destroy left desktops of A"
    assert parents_of(conn, inventory_a) == {}, "destroy left the parent of A"
    assert sorted(desktops_of(conn, inventory_b)) == sorted(names_b), "destroy of A touched B"
    assert parents_of(conn, inventory_b).keys() == parents_b.keys(), "B's parent changed"
    for name, record in parents_of(conn, inventory_b).items():
        assert parent.usable(record), f"B's parent {name} lost its disk, state or RAM file"
    remaining = [f for f in shared_pool.files() if f.startswith(REPLICA_PREFIX)]
    assert remaining == replicas, f"the replica B uses changed: {replicas} -> {remaining}"
    desktops_b = {d["name"]: d for pool in status(path_b)["pools"] for d in pool["desktops"]}
    for name in names_b:
        assert desktops_b[name]["state"] == "running", f"{name}: {desktops_b[name]['state']}"
        assert guest_hostname(path_b, name) == name, f"{name} does not answer as itself"
    again = run_labctl("apply", str(path_b), timeout=COMMAND_TIMEOUT)
    assert again.returncode == 0, describe(again)
    assert "Nothing to change" in again.stdout, f"B no longer converged: {describe(again)}"


# MACs and ports handed out by two labctl processes at once.

# Runs in a second process: hands out one port of a one-port range and one MAC, prints
# both, and keeps its reservations until its stdin closes.
HOLDER = """
import sys
import libvirt
from orchestrator.identity.allocate import HostAllocator
from orchestrator.identity.reservations import Reservations

port, key = int(sys.argv[1]), sys.argv[2]
allocator = HostAllocator(libvirt.open("test:///default"), port_range=(port, port),
                          reservations=Reservations(key))
print(allocator.ssh_port(), allocator.mac(), flush=True)
sys.stdin.read()
"""


class RepeatingRandom:
    """A stand-in for SystemRandom whose MAC bytes repeat ``mac`` once, then count up."""

    def __init__(self, mac: str):
        self.values = [int(part, 16) for part in mac.split(":")[3:]]
        self.counter = 0

    def randrange(self, stop: int) -> int:
        if self.values:
            return self.values.pop(0)
        self.counter += 1
        return self.counter % stop


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_allocators_in_two_processes(tmp_path, monkeypatch):
    """A port or MAC another labctl process handed out is skipped until that process ends."""
    monkeypatch.setenv("LABCTL_DATA_DIR", str(tmp_path))
    key = f"test:///default#{unique_name('r')}"
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(port), key], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        held_port, held_mac = holder.stdout.readline().split()
        assert int(held_port) == port
        conn = libvirt.open("test:///default")
        allocator = HostAllocator(conn, port_range=(port, port), reservations=Reservations(key))
        with pytest.raises(ConflictError):
            allocator.ssh_port()
        monkeypatch.setattr(allocate.random, "SystemRandom", lambda: RepeatingRandom(held_mac))
        allocator = HostAllocator(conn, reservations=Reservations(key))
        mac = allocator.mac()
        assert mac != held_mac, "the MAC of the other process was handed out again"
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    after = HostAllocator(conn, port_range=(port, port), reservations=Reservations(key))
    assert after.ssh_port() == port, "the reservation outlived its process"
