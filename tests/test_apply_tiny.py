"""labctl apply, plan, status, ssh and destroy on real tiny guests through libvirt.

Each guest is the tiny busybox image under TCG with 128 MiB. It was ready in 6-25 s
on a 2-vCPU host, depending on how many other guests ran. The tests that only read
desktops share one inventory with a linked pool of two and a full pool of one, because
an apply for each of them would add about a minute. The host key test restores what it
edits. Each xdist worker that runs one of these tests applies the inventory once. Tests
that change desktops write their own inventories through ``make_inventory``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl, unique_name

from orchestrator import paths
from orchestrator.identity import keys
from orchestrator.provision.desktop import os_volume_name, seed_volume_name
from orchestrator.state import metadata
from orchestrator.storage import replica

pytestmark = pytest.mark.libvirt

# Seconds one apply may take, with a few tiny guests under TCG on a loaded host.
APPLY_TIMEOUT = 600
SSH_TIMEOUT = 60
MEMORY = "128MiB"
DEFAULTS = {"network": "lab", "hardware": {"memory": MEMORY}}


def pool(prefix: str, size: int, clone: str = "linked", memory: str = MEMORY) -> dict:
    """Return a pool of the tiny image whose desktops are named ``prefix1``, ``prefix2``..."""
    return {"image": "tiny", "clone": clone, "size": size, "naming": f"{prefix}{{n}}",
            "network": "lab", "hardware": {"memory": memory}}


def describe_run(result: subprocess.CompletedProcess) -> str:
    """Format a finished labctl run for an assertion message."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def apply_ok(path: Path) -> subprocess.CompletedProcess:
    result = run_labctl("apply", str(path), timeout=APPLY_TIMEOUT)
    assert result.returncode == 0, f"labctl apply {path} failed: {describe_run(result)}"
    return result


def status_desktops(path: Path) -> dict[str, dict]:
    """Return ``labctl status -o json`` as desktop name -> desktop."""
    result = run_labctl("status", "-o", "json", str(path), check=True, timeout=60)
    data = json.loads(result.stdout)
    return {desktop["name"]: desktop for group in data["pools"] for desktop in group["desktops"]}


def plan_actions(path: Path) -> list[dict]:
    result = run_labctl("plan", "-o", "json", str(path), check=True, timeout=60)
    return json.loads(result.stdout)["actions"]


def actions_of(actions: list[dict], kind: str) -> list[str]:
    return sorted(action["desktop"] for action in actions if action["action"] == kind)


def guest_output(path: Path, desktop: str, *command: str) -> subprocess.CompletedProcess:
    return run_labctl("ssh", desktop, "-i", str(path), "--", *command, timeout=SSH_TIMEOUT)


def pool_volume_names(conn: libvirt.virConnect) -> set[str]:
    # No refresh: libvirt rejects it while another worker builds a volume, and it lists
    # the volumes created through its API without one.
    storage = conn.storagePoolLookupByName(TEST_POOL)
    return {volume.name() for volume in storage.listAllVolumes(0)}


def domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def persistent_memory_kib(conn: libvirt.virConnect, name: str) -> int:
    xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    element = ET.fromstring(xml).find("memory")
    assert element is not None and element.get("unit") == "KiB", f"{name}: odd <memory> {xml}"
    return int(element.text or 0)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def replica_path(version: str) -> str:
    return f"{TEST_POOL_PATH}/labctl-replica-{version}.qcow2"


def edit_pools(path: Path, pools: dict) -> Path:
    """Replace the pools of the inventory file at ``path``, as a user edits it."""
    document = yaml.safe_load(path.read_text())
    document["pools"] = pools
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def forget_local_state(inventory: str, desktop_prefixes: list[str]) -> None:
    """Remove the access key and known_hosts files labctl left on this machine for a test."""
    shutil.rmtree(keys.access_key_path(inventory).parent, ignore_errors=True)
    known_hosts = paths.state_dir() / "known_hosts"
    for prefix in desktop_prefixes:
        for path in known_hosts.glob(f"{prefix}*.known"):
            path.unlink(missing_ok=True)


@pytest.fixture
def lab(make_inventory):
    """``make_inventory`` with the tiny guests' defaults, removing local keys afterwards."""
    inventories: list[tuple[str, list[str]]] = []

    def make(pools: dict, *, name: str) -> Path:
        prefixes = [spec["naming"].split("{", 1)[0] for spec in pools.values()]
        inventories.append((name, prefixes))
        return make_inventory(pools, name=name, defaults=DEFAULTS)

    yield make
    for name, prefixes in inventories:
        forget_local_state(name, prefixes)


@dataclass(frozen=True)
class SharedLab:
    path: Path
    apply: subprocess.CompletedProcess
    linked: list[str]
    full: list[str]

    @property
    def desktops(self) -> list[str]:
        return self.linked + self.full


@pytest.fixture(scope="session")
def shared_lab(tmp_path_factory, tiny_image) -> SharedLab:
    """Apply a linked pool of 2 and a full pool of 1 once per worker, and destroy them last.

    Session scope, not module scope, because xdist interleaves modules on a worker and
    each switch would tear a module fixture down and apply it again.
    """
    name = unique_name("t")
    linked, full = unique_name("l"), unique_name("f")
    document = {
        "name": name,
        "hosts": {"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH}}},
        "images": {"tiny": {"build": "tiny"}},
        "networks": {"lab": {"mode": "user"}},
        "defaults": DEFAULTS,
        "pools": {"linked": pool(linked, 2), "full": pool(full, 1, clone="full")},
    }
    path = tmp_path_factory.mktemp("shared-lab") / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    result = run_labctl("apply", str(path), timeout=APPLY_TIMEOUT)
    try:
        yield SharedLab(path, result, [f"{linked}1", f"{linked}2"], [f"{full}1"])
    finally:
        run_labctl("destroy", str(path))
        forget_local_state(name, [linked, full])


@pytest.fixture
def applied(shared_lab) -> SharedLab:
    """The shared lab, failing the test up front if its apply failed."""
    assert shared_lab.apply.returncode == 0, f"apply failed: {describe_run(shared_lab.apply)}"
    return shared_lab


# One apply of a linked pool of 2 and a full pool of 1.


def test_apply_exit_clean(shared_lab):
    assert shared_lab.apply.returncode == 0, describe_run(shared_lab.apply)
    assert "Traceback" not in shared_lab.apply.stderr, shared_lab.apply.stderr


def test_status_identities_distinct(applied):
    desktops = status_desktops(applied.path)
    assert sorted(desktops) == sorted(applied.desktops), f"status lists {sorted(desktops)}"
    for name, desktop in desktops.items():
        assert desktop["state"] == "running", f"{name} is {desktop['state']}"
        assert desktop["hostname"] == name, f"{name} has hostname {desktop['hostname']}"
        assert desktop["machine_id"] == desktop["uuid"].replace("-", ""), (
            f"{name}: machine-id {desktop['machine_id']} is not its UUID {desktop['uuid']}"
        )
    for key in ("mac", "uuid", "hostname", "machine_id", "ssh_host_key"):
        values = [desktop[key] for desktop in desktops.values()]
        assert all(values), f"a desktop has no {key}: {values}"
        assert len(set(values)) == len(values), f"{key} repeats across desktops: {values}"


def test_linked_chain_on_replica(applied, tiny_image):
    desktops = status_desktops(applied.path)
    expected_replica = replica_path(tiny_image.version)
    for name in applied.linked:
        overlay = desktops[name]["disk"]["path"]
        chain = [layer["path"] for layer in desktops[name]["disk"]["backing_chain"]]
        assert chain == [overlay, expected_replica], f"{name}: backing chain {chain}"
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", overlay],
            check=True, capture_output=True, text=True,
        ).stdout)
        assert os.path.isabs(info["backing-filename"]), (
            f"{name}: relative backing file {info['backing-filename']}"
        )
        assert info["backing-filename"] == expected_replica
        assert info["backing-filename-format"] == "qcow2", f"{name}: backing format not recorded"


def test_full_chain_one_layer(applied):
    desktops = status_desktops(applied.path)
    for name in applied.full:
        disk = desktops[name]["disk"]
        chain = [layer["path"] for layer in disk["backing_chain"]]
        assert chain == [disk["path"]], f"{name}: a full clone has the chain {chain}"


def test_volume_modes(applied, tiny_image):
    desktops = status_desktops(applied.path)
    for name, desktop in desktops.items():
        assert desktop["seed"], f"{name} has no seed volume"
        assert mode_of(desktop["seed"]) == 0o600, (
            f"{name}: seed is mode {mode_of(desktop['seed']):o} but contains the private host key"
        )
    disk = replica_path(tiny_image.version)
    assert mode_of(disk) == 0o444, f"replica is mode {mode_of(disk):o}, must be read-only"


# Identity read back from inside each guest.


def test_ssh_reads_guest_identity(applied):
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is missing (apt-get install openssh-client); "
                    "labctl ssh needs it")
    desktops = status_desktops(applied.path)
    for name, desktop in desktops.items():
        machine_id = guest_output(applied.path, name, "cat", "/etc/machine-id")
        assert machine_id.returncode == 0, f"ssh to {name}: {describe_run(machine_id)}"
        assert machine_id.stdout.strip() == desktop["machine_id"], (
            f"{name}: guest machine-id {machine_id.stdout.strip()!r} differs from the record"
        )
        hostname = guest_output(applied.path, name, "hostname")
        assert hostname.returncode == 0, f"ssh to {name}: {describe_run(hostname)}"
        assert hostname.stdout.strip() == name, f"{name}: guest hostname {hostname.stdout!r}"


# A second apply changes nothing.


def test_second_apply_unchanged(applied):
    before = status_desktops(applied.path)
    again = apply_ok(applied.path)
    assert "Nothing to change" in again.stdout, again.stdout
    actions = plan_actions(applied.path)
    assert {action["action"] for action in actions} == {"keep"}, actions
    assert sorted(action["desktop"] for action in actions) == sorted(applied.desktops)
    after = status_desktops(applied.path)
    for name in applied.desktops:
        assert after[name]["uuid"] == before[name]["uuid"], f"{name} was re-created"


# labctl ssh verifies the host key.


def test_ssh_rejects_changed_key(applied, conn):
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is missing (apt-get install openssh-client); "
                    "labctl ssh needs it")
    desktop = applied.linked[0]
    trusted = guest_output(applied.path, desktop, "echo", "reached-guest")
    assert trusted.returncode == 0, f"ssh with the recorded key failed: {describe_run(trusted)}"
    assert trusted.stdout.strip() == "reached-guest"

    domain = conn.lookupByName(desktop)
    record = metadata.read(domain)
    assert record is not None, f"{desktop} has no labctl metadata"
    recorded_key = record.extra["ssh_host_key"]
    record.extra["ssh_host_key"] = keys.generate_ed25519(f"root@{desktop}").public
    metadata.write(domain, record)
    try:
        changed = guest_output(applied.path, desktop, "echo", "reached-guest")
    finally:
        record.extra["ssh_host_key"] = recorded_key
        metadata.write(domain, record)
    assert changed.returncode != 0, f"ssh accepted an unknown host key: {describe_run(changed)}"
    assert "reached-guest" not in changed.stdout, "the command ran despite the wrong host key"
    assert "Host key verification failed" in changed.stderr, changed.stderr


# Growing, shrinking and changing memory.


def test_resize_and_memory_update(lab, conn):
    prefix = unique_name("r")
    path = lab({"linked": pool(prefix, 2)}, name=unique_name("t"))
    apply_ok(path)
    original = status_desktops(path)
    assert sorted(original) == [f"{prefix}1", f"{prefix}2"]

    edit_pools(path, {"linked": pool(prefix, 3)})
    actions = plan_actions(path)
    assert actions_of(actions, "create") == [f"{prefix}3"], actions
    assert actions_of(actions, "keep") == [f"{prefix}1", f"{prefix}2"], actions
    apply_ok(path)
    after_grow = status_desktops(path)
    assert sorted(after_grow) == [f"{prefix}1", f"{prefix}2", f"{prefix}3"]
    for desktop in original:
        assert after_grow[desktop]["uuid"] == original[desktop]["uuid"], f"{desktop} re-created"

    edit_pools(path, {"linked": pool(prefix, 2)})
    actions = plan_actions(path)
    assert actions_of(actions, "delete") == [f"{prefix}3"], actions
    apply_ok(path)
    after_shrink = status_desktops(path)
    assert sorted(after_shrink) == [f"{prefix}1", f"{prefix}2"]
    for desktop in original:
        assert after_shrink[desktop]["uuid"] == original[desktop]["uuid"], f"{desktop} changed"
    assert not domain_exists(conn, f"{prefix}3"), "the deleted desktop's domain is still defined"
    left = pool_volume_names(conn) & {os_volume_name(f"{prefix}3"), seed_volume_name(f"{prefix}3")}
    assert not left, f"volumes of the deleted desktop remain: {left}"

    disks = {desktop: os.stat(after_shrink[desktop]["disk"]["path"]).st_ino
             for desktop in original}
    edit_pools(path, {"linked": pool(prefix, 2, memory="160MiB")})
    actions = plan_actions(path)
    assert actions_of(actions, "update") == [f"{prefix}1", f"{prefix}2"], actions
    apply_ok(path)
    updated = status_desktops(path)
    for desktop in original:
        assert updated[desktop]["uuid"] == original[desktop]["uuid"], f"{desktop} re-created"
        disk = updated[desktop]["disk"]["path"]
        assert disk == original[desktop]["disk"]["path"], f"{desktop} moved to {disk}"
        assert os.stat(disk).st_ino == disks[desktop], f"{desktop}: its disk was re-created"
        assert persistent_memory_kib(conn, desktop) == 160 * 1024, f"{desktop}: memory unchanged"
    assert {action["action"] for action in plan_actions(path)} == {"keep"}


# destroy, replicas and two inventories side by side.


def test_destroy_two_inventories(lab, conn, tiny_image):
    first_prefix, second_prefix = unique_name("a"), unique_name("b")
    first = lab({"linked": pool(first_prefix, 1)}, name=unique_name("t"))
    second = lab({"linked": pool(second_prefix, 1)}, name=unique_name("t"))
    first_desktop, second_desktop = f"{first_prefix}1", f"{second_prefix}1"
    apply_ok(first)
    first_before = status_desktops(first)
    apply_ok(second)
    second_before = status_desktops(second)
    assert sorted(second_before) == [second_desktop], "status mixes inventories"
    first_after = status_desktops(first)
    assert sorted(first_after) == [first_desktop], "status mixes inventories"
    assert first_after[first_desktop]["uuid"] == first_before[first_desktop]["uuid"], (
        "applying the second inventory re-created the first one's desktop"
    )
    assert "Nothing to change" in apply_ok(first).stdout

    destroyed = run_labctl("destroy", str(first), timeout=APPLY_TIMEOUT)
    assert destroyed.returncode == 0, describe_run(destroyed)
    assert not domain_exists(conn, first_desktop), f"destroy left the domain {first_desktop}"
    volumes = pool_volume_names(conn)
    first_volumes = {os_volume_name(first_desktop), seed_volume_name(first_desktop)}
    second_volumes = {os_volume_name(second_desktop), seed_volume_name(second_desktop)}
    assert not volumes & first_volumes, f"destroy left volumes: {volumes & first_volumes}"
    assert domain_exists(conn, second_desktop), "destroy removed another inventory's desktop"
    assert conn.lookupByName(second_desktop).isActive(), f"{second_desktop} stopped"
    assert second_volumes <= volumes, f"destroy removed volumes of {second_desktop}"
    shared_replica = os.path.basename(replica_path(tiny_image.version))
    assert shared_replica in volumes, "destroy removed a replica still used by another desktop"
    second_after = status_desktops(second)
    assert second_after[second_desktop]["uuid"] == second_before[second_desktop]["uuid"]

    destroyed = run_labctl("destroy", str(second), timeout=APPLY_TIMEOUT)
    assert destroyed.returncode == 0, describe_run(destroyed)
    assert not domain_exists(conn, second_desktop), f"destroy left the domain {second_desktop}"
    volumes = pool_volume_names(conn)
    assert not volumes & second_volumes, f"destroy left volumes: {volumes & second_volumes}"
    if shared_replica not in destroyed.stdout:
        # Parallel test workers share the replica, so destroy may keep it while they use it.
        storage = conn.storagePoolLookupByName(TEST_POOL)
        users = replica.replica_users(conn, storage, replica_path(tiny_image.version))
        assert users, "destroy kept the replica although no domain or volume uses it"


# Refresh: under the same name, UUID and MAC, a linked clone gets a new OS disk from the
# replica and a full clone is reverted to its post-customization snapshot.


@pytest.mark.parametrize("clone", ["linked", "full"])
def test_refresh_keeps_identity_new_disk(lab, clone):
    prefix = unique_name("h")
    path = lab({"pool": pool(prefix, 1, clone=clone)}, name=unique_name("t"))
    apply_ok(path)
    name = f"{prefix}1"
    before = status_desktops(path)[name]
    written = guest_output(path, name, "touch /data/refresh-marker && sync")
    assert written.returncode == 0, describe_run(written)
    present = guest_output(path, name, "test", "-e", "/data/refresh-marker")
    assert present.returncode == 0, f"the marker was not written: {describe_run(present)}"
    result = run_labctl("refresh", str(path), name, timeout=APPLY_TIMEOUT)
    assert result.returncode == 0, describe_run(result)
    after = status_desktops(path)[name]
    for key in ("uuid", "mac", "machine_id", "hostname"):
        assert after[key] == before[key], f"{key} changed: {before[key]} -> {after[key]}"
    # A new disk is a new cloud-init instance, but a reverted one keeps its generation.
    increment = 0 if clone == "full" else 1
    assert after["generation"] == before["generation"] + increment
    assert after["ssh"]["port"] == before["ssh"]["port"]
    marker = guest_output(path, name, "test", "-e", "/data/refresh-marker")
    assert marker.returncode != 0, "the refreshed desktop still has the file written before"


def test_refresh_unknown_desktop_fails(lab):
    path = lab({"pool": pool(unique_name("u"), 1)}, name=unique_name("t"))
    result = run_labctl("refresh", str(path), "nosuchdesk", timeout=APPLY_TIMEOUT)
    assert result.returncode == 1, describe_run(result)
    assert "desktop nosuchdesk does not exist in inventory" in result.stderr, result.stderr
