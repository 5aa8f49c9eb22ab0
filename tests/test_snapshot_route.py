"""Which refresh a desktop gets: the revert to its snapshot, or a new copy (no guest).

The disks are real qcow2 files made with qemu-img in the test's directory.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.provision import revert
from orchestrator.provision.snapshot import NAME_KEY, SNAPSHOT_NAME, TAKEN_KEY, snapshot_age
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import qemuimg

LOCAL = SimpleNamespace(settings=SimpleNamespace(uri="qemu:///system"))
REMOTE = SimpleNamespace(settings=SimpleNamespace(uri="qemu+ssh://lab-host/system"))


@dataclass
class Request:
    """The two parts of a DesktopRequest that the choice reads."""

    clone: str = "full"
    settings_hash: str = "abc"

    def config_hash(self) -> str:
        return self.settings_hash


def make_disk(tmp_path: Path, *, snapshot: bool) -> str:
    disk = tmp_path / "os.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    if snapshot:
        subprocess.run(["qemu-img", "snapshot", "-c", SNAPSHOT_NAME, str(disk)], check=True)
    return str(disk)


def make_record(disk: str, *, clone: str = "full", snapshot: bool = True) -> DesktopRecord:
    extra = {NAME_KEY: SNAPSHOT_NAME, TAKEN_KEY: "2026-01-01T00:00:00+00:00"} if snapshot else {}
    return DesktopRecord(inventory="inv", pool="lab", index=1, clone=clone, image="tiny@1",
                         host="local", hostname="d1", fqdn="", machine_id="0" * 32,
                         mac="52:54:00:00:00:01", disk=disk, config_hash="abc", extra=extra)


def test_snapshot_route_chosen(tmp_path):
    record = make_record(make_disk(tmp_path, snapshot=True))
    assert revert.fallback_reason(LOCAL, record, Request()) == ""


@pytest.mark.parametrize(("case", "expected"), [
    ("linked", "not a full clone"),
    ("no record", "not a full clone"),
    ("not recorded", "no post-customization snapshot"),
    ("remote", "is remote"),
    ("settings changed", "settings changed"),
    ("not in disk", "has no internal snapshot labctl-customized"),
    ("disk missing", "cannot be read"),
])
def test_snapshot_route_fallback(tmp_path, case, expected):
    disk = make_disk(tmp_path, snapshot=case != "not in disk")
    record: DesktopRecord | None = make_record(disk, clone="linked" if case == "linked" else "full",
                                               snapshot=case != "not recorded")
    request, ctx = Request(), LOCAL
    if case == "no record":
        record = None
    elif case == "remote":
        ctx = REMOTE
    elif case == "settings changed":
        request = Request(settings_hash="def")
    elif case == "disk missing":
        Path(disk).unlink()
    reason = revert.fallback_reason(ctx, record, request)
    assert expected in reason, f"{case}: reason {reason!r}"


def test_apply_snapshot_reverts_writes(tmp_path):
    disk = make_disk(tmp_path, snapshot=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", disk], check=True,
                   capture_output=True)
    qemuimg.apply_snapshot(disk, SNAPSHOT_NAME)
    check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 64k", disk],
                           capture_output=True, text=True)
    # qemu-io exits 1 and prints "Pattern verification failed" if the data is not zeros.
    assert "Pattern verification failed" not in check.stdout, "the write survived the revert"
    assert check.returncode == 0, f"qemu-io failed: {check.stdout}{check.stderr}"
    assert qemuimg.snapshot_names(disk) == [SNAPSHOT_NAME], "the revert removed the snapshot"


def test_apply_snapshot_missing_names_disk(tmp_path):
    disk = make_disk(tmp_path, snapshot=False)
    with pytest.raises(qemuimg.ImageError) as raised:
        qemuimg.apply_snapshot(disk, SNAPSHOT_NAME)
    assert raised.value.where == disk
    assert SNAPSHOT_NAME in raised.value.message


def test_snapshot_age_from_record():
    record = make_record("/nonexistent", snapshot=False)
    assert snapshot_age(record) is None
    aged = make_record("/nonexistent")
    age = snapshot_age(aged)
    assert age is not None
    assert age > 0
