"""labctl recompose on real tiny guests: a rolling push of a new image version and a rollback.

Two image versions are made from the tiny image by writing random bytes into the unused
first kilobyte of its ext4 data disk, so their hashes (and replicas) belong to this test
alone. They are registered under a unique catalog name and removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import TEST_POOL_PATH, run_labctl, unique_name
from test_apply_tiny import APPLY_TIMEOUT, DEFAULTS, apply_ok, describe_run, status_desktops

from orchestrator import paths
from orchestrator.images import catalog
from orchestrator.images.catalog import ImageVersion
from orchestrator.inventory import load_inventory
from orchestrator.plan import make_plan
from orchestrator.recompose import MARK, recompose_on_release
from orchestrator.state import events, metadata

pytestmark = pytest.mark.libvirt


def make_version(base: ImageVersion, name: str, work: Path) -> ImageVersion:
    """Register a copy of ``base`` whose disk differs in random bytes no reader uses."""
    disk = work / f"{name}-{secrets.token_hex(4)}.qcow2"
    shutil.copyfile(base.disk, disk)
    disk.chmod(0o644)
    for offset in range(8):  # ext4 leaves its first 1024 bytes unused
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -P {secrets.randbelow(255) + 1} {offset} 1", str(disk)],
                       check=True, capture_output=True)
    assert base.boot is not None, "the tiny image boots its kernel directly"
    return catalog.register(
        name, disk, boot_files={"kernel": base.boot_path(base.boot.kernel),
                                "initrd": base.boot_path(base.boot.initrd)},
        cmdline=base.boot.cmdline, identity=base.identity, agent=base.agent, source="test")


@pytest.fixture
def two_versions(tiny_image, tmp_path):
    name = unique_name("rc")
    try:
        yield name, make_version(tiny_image, name, tmp_path), make_version(tiny_image, name,
                                                                           tmp_path)
    finally:
        shutil.rmtree(paths.images_dir() / name, ignore_errors=True)


def pin(path: Path, catalog_name: str, version: str) -> None:
    document = yaml.safe_load(path.read_text())
    document["images"] = {"gold": {"catalog": catalog_name, "version": version}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def replica_file(version: str) -> str:
    return f"{TEST_POOL_PATH}/labctl-replica-{version}.qcow2"


def set_session(conn: libvirt.virConnect, desktop: str, user: str) -> None:
    """Check a desktop out to ``user`` (or release it with ""), as labctl checkout would."""
    domain = conn.lookupByName(desktop)
    record = metadata.read(domain)
    assert record is not None, f"{desktop} has no labctl record"
    record.session_user = user
    record.session_since = "2026-01-01T00:00:00+00:00" if user else ""
    metadata.write(domain, record)


def release_and_recompose(path: Path, desktop: str, conn: libvirt.virConnect) -> bool:
    """What labctl release does for a desktop marked by a wait-for-logoff recompose."""
    set_session(conn, desktop, "")
    plan = make_plan(load_inventory(path))
    try:
        action = next(a for a in plan.actions if a.desktop == desktop)
        ctx = plan.hosts[action.host]
        domain = ctx.conn.lookupByName(desktop)
        record = metadata.read(domain)
        return recompose_on_release(ctx, plan.inventory.name, domain, record, action.request,
                                    lambda *_: None)
    finally:
        plan.close()


def recompose_json(path: Path) -> tuple[dict, list[dict]]:
    result = run_labctl("recompose", "-o", "json", str(path), timeout=APPLY_TIMEOUT)
    assert result.returncode == 0, f"recompose failed: {describe_run(result)}"
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return lines[-1], lines[:-1]


def most_at_once(lines: list[dict]) -> int:
    """The largest number of desktops whose recompose had started and not yet finished."""
    running: set[str] = set()
    most = 0
    for line in lines:
        if line["step"] != "recompose":
            continue
        if line["status"].startswith("done"):
            running.discard(line["desktop"])
        else:
            running.add(line["desktop"])
        most = max(most, len(running))
    return most


def test_recompose_in_use_waits_for_release(make_inventory, conn, two_versions):
    catalog_name, old, new = two_versions
    prefix = unique_name("rc")
    names = [f"{prefix}{n}" for n in range(1, 5)]
    busy = names[3]
    path = make_inventory(
        {"lab": {"image": "gold", "clone": "linked", "size": 4, "naming": f"{prefix}{{n}}",
                 "recompose": {"min_ready": 1}}},
        images={"gold": {"catalog": catalog_name, "version": old.version}},
        defaults=DEFAULTS)
    apply_ok(path)
    before = status_desktops(path)
    assert all(before[n]["image"] == old.ref for n in names), before
    set_session(conn, busy, "alice")

    # An image that is not in the catalog fails before anything is touched.
    pin(path, catalog_name, "abcdef123456")
    refused = run_labctl("recompose", str(path), timeout=APPLY_TIMEOUT)
    assert refused.returncode != 0, describe_run(refused)
    assert f"{path}:" in refused.stderr, f"the error names no FILE:LINE: {refused.stderr}"
    assert "not in the catalog" in refused.stderr, f"the error gives no reason: {refused.stderr}"
    unchanged = status_desktops(path)
    assert all(unchanged[n]["generation"] == before[n]["generation"] for n in names)

    pin(path, catalog_name, new.version)
    summary, lines = recompose_json(path)
    assert sorted(summary["recomposed"]) == names[:3], summary
    assert summary["waiting"] == [busy], summary
    assert most_at_once(lines) <= 2, f"more than limits.provisioning at once: {lines}"
    after = status_desktops(path)
    for name in names[:3]:
        assert after[name]["image"] == new.ref, f"{name} is on {after[name]['image']}"
    assert after[busy]["image"] == old.ref, "the desktop in use was recomposed under its user"
    record = metadata.read(conn.lookupByName(busy))
    assert record.extra.get(MARK) == new.ref, f"{busy} is not marked: {record.extra}"
    assert record.session_user == "alice", f"{busy}: session changed to {record.session_user}"
    assert os.path.exists(replica_file(old.version)), "the replica in use was removed"
    kinds = [(e.desktop, e.kind) for e in events.recent(load_inventory(path).name)]
    assert (busy, "recompose-wait") in kinds, kinds

    assert release_and_recompose(path, busy, conn), "release did not recompose the desktop"
    released = status_desktops(path)
    assert released[busy]["image"] == new.ref, f"{busy} is on {released[busy]['image']}"
    for name in names:
        for key in ("uuid", "mac", "machine_id"):
            assert released[name][key] == before[name][key], f"{name}: {key} changed"
        assert released[name]["ssh"]["port"] == before[name]["ssh"]["port"], name
        assert released[name]["state"] == "running", f"{name} is {released[name]['state']}"
    assert not os.path.exists(replica_file(old.version)), "the old replica stayed"

    # Rolling back: the old version pinned again, and recompose.
    pin(path, catalog_name, old.version)
    summary, _lines = recompose_json(path)
    assert sorted(summary["recomposed"]) == names, summary
    rolled_back = status_desktops(path)
    for name in names:
        assert rolled_back[name]["image"] == old.ref, f"{name} is on {rolled_back[name]['image']}"
        assert rolled_back[name]["uuid"] == before[name]["uuid"], f"{name}: UUID changed"
    assert not os.path.exists(replica_file(new.version)), "the replica rolled back from stayed"


def test_recompose_force_ends_session(make_inventory, conn, two_versions):
    catalog_name, old, new = two_versions
    prefix = unique_name("rf")
    names = [f"{prefix}1", f"{prefix}2"]
    path = make_inventory(
        {"lab": {"image": "gold", "clone": "linked", "size": 2, "naming": f"{prefix}{{n}}",
                 "recompose": {"strategy": "force", "grace": 3}}},
        images={"gold": {"catalog": catalog_name, "version": old.version}},
        defaults=DEFAULTS)
    apply_ok(path)
    before = status_desktops(path)
    set_session(conn, names[1], "bob")

    pin(path, catalog_name, new.version)
    summary, _lines = recompose_json(path)
    assert sorted(summary["recomposed"]) == names, summary
    assert summary["waiting"] == [], summary
    after = status_desktops(path)
    for name in names:
        assert after[name]["image"] == new.ref, f"{name} is on {after[name]['image']}"
        assert after[name]["uuid"] == before[name]["uuid"], f"{name}: UUID changed"
    record = metadata.read(conn.lookupByName(names[1]))
    assert record.session_user == "", f"the forced session stayed: {record.session_user}"
    kinds = [(e.desktop, e.kind) for e in events.recent(load_inventory(path).name)]
    assert (names[1], "session-ended") in kinds, kinds


def test_recompose_unknown_image_fails(make_inventory):
    path = make_inventory(
        {"lab": {"image": "gold", "clone": "linked", "size": 1, "naming": "rcx{n}"}},
        images={"gold": {"catalog": "nope"}}, defaults=DEFAULTS)
    result = run_labctl("recompose", str(path), timeout=120)
    assert result.returncode != 0, describe_run(result)
    lines = path.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, start=1) if text.strip() == "gold:")
    assert f"{path}:{line}" in result.stderr, f"no FILE:LINE of the image: {result.stderr}"
    assert "image nope is not in the catalog" in result.stderr, result.stderr
    assert "labctl image import" in result.stderr, f"no fix given: {result.stderr}"


def test_recompose_unknown_pool_fails(make_inventory):
    path = make_inventory({"lab": {"image": "tiny", "clone": "linked", "size": 1,
                                   "naming": "rcy{n}"}}, defaults=DEFAULTS)
    result = run_labctl("recompose", str(path), "nosuchpool", timeout=120)
    assert result.returncode != 0, describe_run(result)
    assert "pool nosuchpool is not in inventory" in result.stderr, result.stderr
