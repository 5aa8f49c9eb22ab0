"""Refresh of full clones from their post-customization snapshot, on real tiny guests.

The tiny guest mounts its OS disk's ext4 file system at /data, so a file written there
after ready is on the qcow2 disk, and a revert to the snapshot removes it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl, unique_name
from test_rebalance import remove_storage_pool
from test_recompose import pin, two_versions  # noqa: F401 (two_versions is a fixture)

from orchestrator.provision.snapshot import SNAPSHOT_NAME

pytestmark = pytest.mark.libvirt

# Seconds one command may take with a few tiny guests booting under TCG on a loaded host.
COMMAND_TIMEOUT = 600
MARKER = "/data/written-after-ready"


def full_pool(prefix: str) -> dict:
    return {"image": "tiny", "clone": "full", "size": 1, "naming": f"{prefix}{{n}}",
            "network": "lab", "hardware": {"memory": "128MiB"}}


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def ok(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = run_labctl(*args, timeout=COMMAND_TIMEOUT, env=env)
    assert result.returncode == 0, f"labctl {' '.join(args)} failed: {describe(result)}"
    return result


def desktop(path: Path, name: str) -> dict:
    data = json.loads(ok("status", str(path), "-o", "json").stdout)
    found = {d["name"]: d for group in data["pools"] for d in group["desktops"]}
    assert name in found, f"status lists no desktop {name}: {sorted(found)}"
    return found[name]


def guest(path: Path, name: str, command: str) -> subprocess.CompletedProcess:
    result = run_labctl("ssh", name, "-i", str(path), "--", command, timeout=60)
    assert result.returncode == 0, f"SSH command {command!r} failed: {describe(result)}"
    return result


def snapshot_names(disk: str) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", disk], check=True,
                         capture_output=True, text=True).stdout
    return [entry["name"] for entry in json.loads(out).get("snapshots", [])]


def write_marker(path: Path, name: str) -> str:
    """Write the marker file on the guest's disk; return the guest's boot id."""
    guest(path, name, f"echo written > {MARKER} && sync")
    listed = guest(path, name, f"ls {MARKER}").stdout
    assert MARKER in listed, f"the marker was not written: {listed!r}"
    return guest(path, name, "cat /proc/sys/kernel/random/boot_id").stdout.strip()


def assert_marker_gone(path, name: str, after: str) -> None:
    listed = guest(path, name, f"test -e {MARKER} && echo present || echo absent")
    assert "absent" in listed.stdout, f"the marker survived {after}: {listed.stdout}"


def identity(status: dict) -> dict:
    """The parts of a desktop a refresh must keep."""
    return {key: status[key] for key in ("uuid", "mac", "hostname", "machine_id", "seed",
                                          "generation", "ssh", "ssh_host_key")}


def test_full_refresh_reverts_snapshot(make_inventory):
    prefix = unique_name("f")
    name = f"{prefix}1"
    path = make_inventory({"lab": full_pool(prefix)})
    ok("apply", str(path))
    before = desktop(path, name)
    disk = before["disk"]["path"]
    assert before["snapshot"] is not None, f"status shows no snapshot: {before}"
    assert before["snapshot"]["name"] == SNAPSHOT_NAME
    assert snapshot_names(disk) == [SNAPSHOT_NAME], "qemu-img lists other snapshots"
    inode = os.stat(disk).st_ino
    boot_id = write_marker(path, name)

    refreshed = ok("refresh", str(path), name)
    assert "revert" in refreshed.stdout, f"refresh did not revert:\n{refreshed.stdout}"

    after = desktop(path, name)
    assert after["state"] == "running", f"{name} is {after['state']} after the refresh"
    assert identity(after) == identity(before), "the refresh changed the identity"
    # The same file, so the disk was reverted in place, not copied from the image again.
    assert after["disk"]["path"] == disk
    assert os.stat(disk).st_ino == inode, "the OS disk is a new file"
    assert snapshot_names(disk) == [SNAPSHOT_NAME], "the revert lost the snapshot"
    assert_marker_gone(path, name, "the refresh")
    new_boot_id = guest(path, name, "cat /proc/sys/kernel/random/boot_id").stdout.strip()
    assert new_boot_id != boot_id, "the guest did not boot again"


def test_full_refresh_drops_managed_save(make_inventory):
    """A suspended desktop's saved memory predates the revert, so it must not come back."""
    prefix = unique_name("f")
    name = f"{prefix}1"
    path = make_inventory({"lab": full_pool(prefix)})
    ok("apply", str(path))
    boot_id = write_marker(path, name)
    subprocess.run(["virsh", "-q", "-c", URI, "managedsave", name], check=True,
                   capture_output=True)
    assert desktop(path, name)["state"] == "saved", "virsh managedsave did not save it"

    ok("refresh", str(path), name)
    after = desktop(path, name)
    assert after["state"] == "running", f"{name} is {after['state']} after the refresh"
    new_boot_id = guest(path, name, "cat /proc/sys/kernel/random/boot_id").stdout.strip()
    assert new_boot_id != boot_id, "the saved memory was restored onto the reverted disk"
    assert_marker_gone(path, name, "the refresh")


def test_full_refresh_without_snapshot_copies(make_inventory):
    """A full clone whose snapshot is gone from the disk gets a new copy of the image."""
    prefix = unique_name("f")
    name = f"{prefix}1"
    path = make_inventory({"lab": full_pool(prefix)})
    ok("apply", str(path))
    before = desktop(path, name)
    disk = before["disk"]["path"]
    write_marker(path, name)
    # qemu-img needs the image closed to delete a snapshot.
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "destroy", name], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-d", SNAPSHOT_NAME, disk], check=True)
    ok("apply", str(path))

    refreshed = ok("-v", "refresh", str(path), name)
    assert "no internal snapshot" in refreshed.stderr, (
        f"no INFO line says why the refresh copies:\n{refreshed.stderr[-3000:]}")
    after = desktop(path, name)
    assert after["uuid"] == before["uuid"]
    assert after["mac"] == before["mac"]
    assert after["generation"] == before["generation"] + 1, "not re-created from the image"
    assert after["snapshot"] is not None, "the new copy took no snapshot"
    assert snapshot_names(after["disk"]["path"]) == [SNAPSHOT_NAME]
    assert_marker_gone(path, name, "the new copy")


def failing_qemu_img(directory: Path) -> dict[str, str]:
    """Return an environment whose qemu-img fails ``snapshot -a`` and runs the real one
    for everything else."""
    real = subprocess.run(["which", "qemu-img"], check=True, capture_output=True,
                          text=True).stdout.strip()
    script = directory / "qemu-img"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = snapshot ] && [ "$2" = -a ]; then\n'
        '    echo "qemu-img: Could not apply snapshot (injected by the test)" >&2\n'
        "    exit 1\n"
        "fi\n"
        f'exec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_full_refresh_revert_failure(make_inventory, tmp_path):
    """A failed revert names the desktop and the step; the next apply re-creates it."""
    prefix = unique_name("f")
    name = f"{prefix}1"
    path = make_inventory({"lab": full_pool(prefix)})
    ok("apply", str(path))
    before = desktop(path, name)

    failed = run_labctl("refresh", str(path), name, timeout=COMMAND_TIMEOUT,
                        env=failing_qemu_img(tmp_path))
    assert failed.returncode != 0, f"the refresh succeeded: {describe(failed)}"
    assert name in failed.stderr, f"the error does not name the desktop:\n{failed.stderr}"
    assert "'revert'" in failed.stderr, f"the error does not name the step:\n{failed.stderr}"
    assert "injected by the test" in failed.stderr, f"qemu-img's reason is lost:\n{failed.stderr}"
    broken = desktop(path, name)
    assert "failed" in broken["state"], f"{name} is {broken['state']} after the failure"

    ok("apply", str(path))
    after = desktop(path, name)
    assert after["state"] == "running", f"{name} is {after['state']} after the apply"
    assert after["uuid"] == before["uuid"]
    assert after["mac"] == before["mac"]
    assert after["snapshot"] is not None, "the re-created desktop took no snapshot"


@pytest.fixture
def other_storage(conn):
    """A second directory storage pool with a unique name, removed after the test."""
    name = unique_name("fsp")
    path = f"/var/lib/labctl/{name}"
    yield name, path
    remove_storage_pool(conn, name, path)


def test_full_refresh_after_move(other_storage, make_inventory):
    """A rebalance move copies the whole qcow2 file, so the snapshot moves with it."""
    storage, storage_path = other_storage
    prefix = unique_name("f")
    name = f"{prefix}1"
    hosts = {"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH},
                       "storage_pools": [{"pool": storage, "path": storage_path}]}}
    path = make_inventory({"lab": full_pool(prefix) | {"storage": [TEST_POOL]}}, hosts=hosts)
    ok("apply", str(path))
    before = desktop(path, name)

    document = yaml.safe_load(path.read_text())
    document["pools"]["lab"]["storage"] = [storage]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    ok("rebalance", str(path))
    moved = desktop(path, name)
    disk = moved["disk"]["path"]
    assert os.path.dirname(disk) == storage_path, f"{name} was not moved: {disk}"
    assert snapshot_names(disk) == [SNAPSHOT_NAME], "the move lost the snapshot"
    assert moved["snapshot"] is not None, "the move dropped the recorded snapshot"
    assert moved["snapshot"]["taken"] == before["snapshot"]["taken"]

    write_marker(path, name)
    refreshed = ok("refresh", str(path), name)
    assert "revert" in refreshed.stdout, f"refresh did not revert:\n{refreshed.stdout}"
    after = desktop(path, name)
    assert after["disk"]["path"] == disk
    assert identity(after) == identity(before), "the refresh changed the identity"
    assert_marker_gone(path, name, "the refresh")


def test_full_recompose_takes_new_snapshot(make_inventory, two_versions):
    """A recompose copies the new image and snapshots it; a refresh then stays on it."""
    catalog_name, old, new = two_versions
    prefix = unique_name("f")
    name = f"{prefix}1"
    spec = full_pool(prefix) | {"image": "gold"}
    path = make_inventory({"lab": spec},
                          images={"gold": {"catalog": catalog_name, "version": old.version}})
    ok("apply", str(path))
    before = desktop(path, name)
    assert before["image"] == old.ref

    pin(path, catalog_name, new.version)
    ok("recompose", str(path))
    after = desktop(path, name)
    assert after["image"] == new.ref, f"{name} is still on {after['image']}"
    assert after["generation"] == before["generation"] + 1, "the desktop was not re-created"
    assert after["uuid"] == before["uuid"]
    assert after["snapshot"] is not None, "the recomposed desktop took no snapshot"
    assert after["snapshot"]["taken"] > before["snapshot"]["taken"], "the snapshot is old"
    assert snapshot_names(after["disk"]["path"]) == [SNAPSHOT_NAME]

    refreshed = ok("refresh", str(path), name)
    assert "revert" in refreshed.stdout, f"refresh did not revert:\n{refreshed.stdout}"
    final = desktop(path, name)
    assert final["image"] == new.ref
    assert final["generation"] == after["generation"], "the refresh re-created the desktop"
