"""Instant clones on real tiny guests: a parent VM, children by restore and by fork.

Each method gets one inventory with an instant pool of 4, applied once per xdist
worker. The checks read every value from inside the guests (through the guest agent
and through `labctl ssh`), not from labctl's records: MAC, hostname, machine-id, SSH
host key, clock. Failure tests drive provisioning in-process and check by name that
nothing of the failed desktop or parent is left on the host.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl, unique_name

from orchestrator.apply import provision, recreate_desktop
from orchestrator.guest import agent
from orchestrator.hosts.context import HostSettings, open_host
from orchestrator.identity import keys
from orchestrator.instant import cloneprep, fork, parent
from orchestrator.provision.request import DesktopRequest, NetworkSpec
from orchestrator.provision.remove import remove_desktop
from orchestrator.provision.steps import StepFailed
from orchestrator.storage import qemuimg
from orchestrator.state import metadata

pytestmark = pytest.mark.libvirt

APPLY_TIMEOUT = 900
SIZE = 4


def instant_pool(prefix: str, method: str, size: int = SIZE) -> dict:
    return {"image": "tiny", "clone": "instant", "instant": {"method": method}, "size": size,
            "naming": f"{prefix}{{n}}", "network": "lab", "hardware": {"memory": "128MiB"}}


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@dataclass(frozen=True)
class InstantLab:
    path: Path
    method: str
    apply: subprocess.CompletedProcess
    names: list[str]

    def status(self) -> dict:
        result = run_labctl("status", str(self.path), "-o", "json")
        assert result.returncode == 0, describe(result)
        return json.loads(result.stdout)

    def desktops(self) -> dict[str, dict]:
        return {d["name"]: d for pool in self.status()["pools"] for d in pool["desktops"]}


def write_inventory(directory: Path, pools: dict) -> Path:
    name = unique_name("i")
    document = {
        "name": name,
        "hosts": {"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH}}},
        "images": {"tiny": {"build": "tiny"}},
        "networks": {"lab": {"mode": "user"}},
        "pools": pools,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="session", params=["restore", "fork"])
def instant_lab(request, tmp_path_factory, tiny_image) -> InstantLab:
    method = request.param
    prefix = unique_name("c")
    path = write_inventory(tmp_path_factory.mktemp(f"instant-{method}"),
                           {"kids": instant_pool(prefix, method)})
    try:
        # Inside the try: a timed-out apply must still be destroyed.
        result = run_labctl("apply", str(path), timeout=APPLY_TIMEOUT)
        yield InstantLab(path, method, result, [f"{prefix}{n}" for n in range(1, SIZE + 1)])
    finally:
        destroyed = run_labctl("destroy", str(path))
        assert destroyed.returncode == 0, f"labctl destroy {path}: {describe(destroyed)}"


@pytest.fixture
def lab(instant_lab) -> InstantLab:
    assert instant_lab.apply.returncode == 0, (
        f"labctl apply of the {instant_lab.method} pool failed: {describe(instant_lab.apply)}")
    return instant_lab


def guest_identity(domain: libvirt.virDomain) -> dict[str, str]:
    """Hostname, machine-id, MACs and SSH host key as the guest itself reports them."""
    interfaces = agent.command(domain, "guest-network-get-interfaces") or []
    macs = sorted(i["hardware-address"] for i in interfaces  # type: ignore[union-attr]
                  if i.get("name") != "lo" and i.get("hardware-address"))
    key = agent.run(domain, ["dropbearkey", "-y", "-f",
                             "/etc/dropbear/dropbear_ed25519_host_key"]).stdout
    public = next((line for line in key.splitlines() if line.startswith("ssh-ed25519")), "")
    return {
        "hostname": agent.check_output(domain, ["hostname"]).strip(),
        "machine_id": agent.check_output(domain, ["cat", "/etc/machine-id"]).strip(),
        "macs": ",".join(macs),
        "host_key": " ".join(public.split()[:2]),
    }


def test_children_ready_with_distinct_identities(lab, conn):
    desktops = lab.desktops()
    assert sorted(desktops) == sorted(lab.names), f"status lists {sorted(desktops)}"
    seen = {}
    for name in lab.names:
        assert desktops[name]["state"] == "running", f"{name}: {desktops[name]['state']}"
        domain = conn.lookupByName(name)
        seen[name] = guest_identity(domain)
        assert seen[name]["hostname"] == name, f"{name}: guest hostname {seen[name]}"
        assert seen[name]["macs"] == desktops[name]["mac"], (
            f"{name}: the guest sees NICs {seen[name]['macs']!r}, expected only "
            f"{desktops[name]['mac']}")
        assert seen[name]["machine_id"] == desktops[name]["machine_id"]
        assert seen[name]["host_key"] == " ".join(desktops[name]["ssh_host_key"].split()[:2])
        offset = agent.clock_offset(domain)
        assert abs(offset) <= 2.0, f"{name}: guest clock is {offset:+.1f} s off the host's"
    parents = lab.status()["parents"]
    assert len(parents) == 1, f"expected one parent, status lists {parents}"
    assert parents[0]["method"] == lab.method, parents
    assert parents[0]["state"] == "ready", parents
    parent_domain = conn.lookupByName(parents[0]["name"])
    record = parent.read_record(parent_domain)
    assert record is not None
    for key in ("hostname", "machine_id", "macs", "host_key"):
        values = [identity[key] for identity in seen.values()]
        assert len(set(values)) == len(values), f"{key} repeats across children: {values}"
    assert parents[0]["name"] not in {identity["hostname"] for identity in seen.values()}
    assert parent_domain.UUIDString().replace("-", "") not in {
        identity["machine_id"] for identity in seen.values()}, "a child kept the parent's id"


def test_children_reachable_by_labctl_ssh(lab):
    for name in lab.names:
        result = run_labctl("ssh", name, "--inventory", str(lab.path), "--", "hostname",
                            timeout=120)
        assert result.returncode == 0, f"labctl ssh {name}: {describe(result)}"
        assert result.stdout.strip() == name


def test_parent_shut_off_with_frozen_disk(lab, conn):
    (entry,) = lab.status()["parents"]
    domain = conn.lookupByName(entry["name"])
    assert not domain.isActive(), "the parent still runs after its save"
    record = parent.read_record(domain)
    assert record is not None
    mode = os.stat(record.disk).st_mode & 0o777
    assert mode == 0o400, f"parent disk is mode {mode:o}, not read-only for its owner only"
    chain = [layer.path for layer in qemuimg.backing_chain(record.disk)]
    assert len(chain) == 2, f"parent disk chain {chain}: not an overlay on the replica"
    assert os.path.basename(chain[1]).startswith("labctl-replica-"), chain
    assert entry["state_bytes"] > 0, entry
    assert os.path.exists(record.state_file), f"state file {record.state_file} is missing"
    if lab.method == "fork":
        assert entry["ram_bytes"] > 0, "fork parent has no RAM file"
        assert entry["state_bytes"] < 16 << 20, (
            f"fork state is {entry['state_bytes']} bytes: x-ignore-shared did not apply")


def test_children_outlive_parent_memory(lab, conn):
    """The parent's QEMU is gone after its save; for fork, the RAM file is removed too."""
    (entry,) = lab.status()["parents"]
    assert not conn.lookupByName(entry["name"]).isActive()
    if lab.method == "fork":
        os.unlink(entry["ram_file"])
    for name in lab.names:
        domain = conn.lookupByName(name)
        assert agent.check_output(domain, ["hostname"]).strip() == name
        result = run_labctl("ssh", name, "--inventory", str(lab.path), "--", "cat",
                            "/etc/machine-id", timeout=120)
        assert result.returncode == 0, f"labctl ssh {name}: {describe(result)}"


def test_child_cold_boot_without_parent_state(lab, conn):
    """A child is a linked clone of the parent's disk once it is defined: it boots cold."""
    name = lab.names[-1]
    domain = conn.lookupByName(name)
    domain.destroy()
    domain.create()
    agent.wait_for_agent(domain, timeout=120)
    identity = guest_identity(domain)
    desktops = lab.desktops()
    assert identity["hostname"] == name, f"after a cold boot: {identity}"
    assert identity["machine_id"] == desktops[name]["machine_id"]


def test_refresh_keeps_name_and_mac_and_cleans_disk(lab, conn):
    name = lab.names[0]
    before = lab.desktops()[name]
    domain = conn.lookupByName(name)
    agent.check_output(domain, ["touch", "/data/refresh-marker"])
    agent.check_output(domain, ["sync"])
    result = run_labctl("refresh", str(lab.path), name, timeout=APPLY_TIMEOUT)
    assert result.returncode == 0, describe(result)
    after = lab.desktops()[name]
    assert after["mac"] == before["mac"]
    assert after["uuid"] == before["uuid"]
    assert after["generation"] == before["generation"] + 1
    domain = conn.lookupByName(name)
    marker = agent.run(domain, ["test", "-e", "/data/refresh-marker"])
    assert marker.exit_code != 0, "the refreshed child still has the file written before"
    assert guest_identity(domain)["macs"] == before["mac"]


# -- failures leave nothing behind ------------------------------------------------------


@pytest.fixture
def test_host():
    settings = HostSettings(name="local", uri=URI, storage_pool=TEST_POOL,
                            storage_path=TEST_POOL_PATH, max_parallel=2)
    ctx = open_host(settings)
    yield ctx
    ctx.close()


def child_request(name: str, image, method: str, **changes) -> DesktopRequest:
    values = dict(name=name, inventory=f"inv-{name}", pool="kids", index=1, clone="instant",
                  image=image, host="local", memory_bytes=128 << 20,
                  network=NetworkSpec("lab", "user"), ready_timeout=120.0, instant=method)
    values.update(changes)
    return DesktopRequest(**values)


def leftovers(conn: libvirt.virConnect, *parts: str) -> list[str]:
    """Domains, volumes and RAM files whose names contain one of ``parts``."""
    def ours(name: str) -> bool:
        return any(part in name for part in parts)

    found = [d.name() for d in conn.listAllDomains(0) if ours(d.name())]
    # The directory, not libvirt's volume list: state files are written by libvirt's save
    # and QEMU, and a pool refresh fails while another worker builds a volume.
    found += [f for f in os.listdir(TEST_POOL_PATH) if ours(f)]
    if os.path.isdir(fork.RAM_DIR):
        found += [f for f in os.listdir(fork.RAM_DIR) if ours(f)]
    return found


@pytest.mark.parametrize("method", ["restore", "fork"])
def test_parent_that_never_answers_leaves_nothing(test_host, tiny_image, method):
    name = unique_name("n")
    request = child_request(name, tiny_image, method, ready_timeout=1.0)
    key = parent.parent_key(request, method, test_host.domain_type)
    with pytest.raises(StepFailed) as caught:
        provision(test_host, request, keys.generate_ed25519("t"), lambda *_: None)
    assert caught.value.step == "parent", f"failed at {caught.value.step}: {caught.value}"
    assert "guest agent" in str(caught.value), str(caught.value)
    assert leftovers(test_host.conn, name, key) == []


@pytest.mark.parametrize("method", ["restore", "fork"])
def test_failed_save_leaves_nothing(test_host, tiny_image, method, monkeypatch):
    name = unique_name("s")
    request = child_request(name, tiny_image, method)
    key = parent.parent_key(request, method, test_host.domain_type)

    def broken_save(self):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(parent.ParentBuild, "save", broken_save)
    with pytest.raises(StepFailed) as caught:
        provision(test_host, request, keys.generate_ed25519("t"), lambda *_: None)
    assert "No space left" in str(caught.value)
    assert leftovers(test_host.conn, name, key) == []


def test_child_failing_cloneprep_is_never_ready(test_host, tiny_image, monkeypatch):
    """ClonePrep writes a wrong machine-id; the readback must catch it and roll back."""
    name = unique_name("p")
    request = child_request(name, tiny_image, "restore")
    key = parent.parent_key(request, "restore", test_host.domain_type)
    arguments = cloneprep.arguments

    def wrong_machine_id(target, epoch):
        argv = arguments(target, epoch)
        return [("0" * 32 if value == target.identity.machine_id else value) for value in argv]

    monkeypatch.setattr(cloneprep, "arguments", wrong_machine_id)
    events: list[tuple[str, str, str]] = []
    try:
        with pytest.raises(StepFailed) as caught:
            provision(test_host, request, keys.generate_ed25519("t"),
                      lambda *event: events.append(event))
        assert caught.value.step == "verify", str(caught.value)
        assert "machine-id" in str(caught.value), str(caught.value)
        assert not [e for e in events if e[0] == name and e[1] == "record"], events
        assert leftovers(test_host.conn, name) == []
    finally:
        for domain, _record in parent.inventory_parents(test_host.conn, request.inventory):
            parent.remove_parent(test_host, domain)
    assert leftovers(test_host.conn, key) == [], "the parent was not removed"


def test_failed_refresh_keeps_identity(test_host, tiny_image, monkeypatch):
    """A re-creation that fails leaves the desktop defined as failed, same UUID and MAC;
    the next one brings it back under that identity."""
    name = unique_name("k")
    request = child_request(name, tiny_image, "restore")
    access = keys.generate_ed25519("t")
    arguments = cloneprep.arguments

    def wrong_machine_id(target, epoch):
        argv = arguments(target, epoch)
        return [("0" * 32 if value == target.identity.machine_id else value) for value in argv]

    def identity() -> tuple[str, str, str]:
        domain = test_host.conn.lookupByName(name)
        record = metadata.read(domain)
        assert record is not None
        return domain.UUIDString(), record.mac, record.state

    try:
        provision(test_host, request, access, lambda *_: None)
        uuid, mac, state = identity()
        assert state == "ready"
        monkeypatch.setattr(cloneprep, "arguments", wrong_machine_id)
        with pytest.raises(StepFailed):
            recreate_desktop(test_host, request.inventory, request, access, lambda *_: None)
        assert identity() == (uuid, mac, "failed"), "the failed refresh lost the identity"
        monkeypatch.setattr(cloneprep, "arguments", arguments)
        recreate_desktop(test_host, request.inventory, request, access, lambda *_: None)
        assert identity() == (uuid, mac, "ready")
    finally:
        for domain in test_host.conn.listAllDomains(0):
            if domain.name() == name:
                remove_desktop(test_host, domain, request.inventory, lambda *_: None)
        for domain, _record in parent.inventory_parents(test_host.conn, request.inventory):
            parent.remove_parent(test_host, domain)


def test_plan_after_apply_builds_nothing(lab):
    result = run_labctl("plan", str(lab.path), "-o", "json")
    assert result.returncode == 0, describe(result)
    plan = json.loads(result.stdout)
    assert plan["build_parents"] == {}, f"plan wants parents again: {plan['build_parents']}"
    kinds = {action["action"] for action in plan["actions"]}
    assert kinds <= {"keep", "start"}, f"plan after apply: {plan['actions']}"
