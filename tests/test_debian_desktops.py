"""Real Debian desktops through labctl apply: identity reset on an image that was not generalized.

These boot the full Debian image under TCG (a minute or more each), so they are
marked slow. The golden image here is deliberately spoiled before import: it carries
a fixed machine-id and SSH host keys, as an image captured from a running machine
would. labctl must still give every clone its own machine-id and host key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_labctl, unique_name

from orchestrator.identity.keys import generate_ed25519
from orchestrator.images import catalog

SPOILED_MACHINE_ID = "0123456789abcdef0123456789abcdef"


def _debugfs_write(raw: Path, guest_path: str, content: str, tmp_path: Path) -> None:
    source = tmp_path / "debugfs-source"
    source.write_text(content)
    for request in (f"rm {guest_path}", f"write {source} {guest_path}"):
        subprocess.run(["debugfs", "-w", "-R", request, str(raw)], check=True,
                       capture_output=True, text=True)


def spoil_image(image, tmp_path: Path) -> Path:
    """Return a qcow2 copy of ``image``'s disk with a populated machine-id and SSH host keys."""
    raw = tmp_path / "spoiled.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", image.disk, str(raw)], check=True)
    _debugfs_write(raw, "/etc/machine-id", SPOILED_MACHINE_ID + "\n", tmp_path)
    key = generate_ed25519("root@golden")
    _debugfs_write(raw, "/etc/ssh/ssh_host_ed25519_key", key.private, tmp_path)
    _debugfs_write(raw, "/etc/ssh/ssh_host_ed25519_key.pub", key.public + "\n", tmp_path)
    spoiled = tmp_path / "spoiled.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(spoiled)], check=True)
    raw.unlink()
    return spoiled


@pytest.fixture
def spoiled_image(debian_image, tmp_path):
    """The spoiled disk in the catalog, booting with the Debian image's kernel and initrd."""
    boot = debian_image.boot
    image = catalog.register(
        unique_name("spoiled"), spoil_image(debian_image, tmp_path),
        boot_files={"kernel": debian_image.boot_path(boot.kernel),
                    "initrd": debian_image.boot_path(boot.initrd)},
        cmdline=boot.cmdline, source="test",
    )
    yield image
    # The name's directory too: it holds only this one version.
    shutil.rmtree(image.directory.parent, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.libvirt
def test_clones_of_spoiled_image_unique(spoiled_image, make_inventory):
    prefix = unique_name("dsp")
    path = make_inventory(
        {"spoiled": {"image": "spoiled", "clone": "linked", "size": 2,
                     "naming": f"{prefix}-{{n}}", "network": "lab",
                     "hardware": {"memory": "512MiB"},
                     "identity": {"users": [{"name": "student", "sudo": True}]}}},
        images={"spoiled": {"catalog": spoiled_image.name}},
    )
    applied = run_labctl("apply", str(path))
    assert applied.returncode == 0, f"apply failed:\n{applied.stdout}\n{applied.stderr}"

    status = json.loads(run_labctl("status", str(path), "-o", "json", check=True).stdout)
    desktops = status["pools"][0]["desktops"]
    assert len(desktops) == 2, desktops
    seen_ids = set()
    for desktop in desktops:
        name = desktop["name"]
        machine_id = run_labctl("ssh", name, "-i", str(path), "--", "cat", "/etc/machine-id",
                                check=True).stdout.strip()
        assert machine_id != SPOILED_MACHINE_ID, f"{name} kept the golden image's machine-id"
        assert machine_id == desktop["uuid"].replace("-", ""), (
            f"{name}: machine-id {machine_id} is not derived from its UUID {desktop['uuid']}")
        seen_ids.add(machine_id)
        hostname = run_labctl("ssh", name, "-i", str(path), "--", "hostname",
                              check=True).stdout.strip()
        assert hostname == name
    assert len(seen_ids) == 2, "the two clones share a machine-id"
    keys = {desktop["ssh_host_key"].split()[1] for desktop in desktops}
    assert len(keys) == 2, "the two clones share an SSH host key"
    # Each `labctl ssh` above verified the guest's host key against labctl's record, so
    # the golden image's own key is gone from both guests.
