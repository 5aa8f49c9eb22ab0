"""The Debian 12 golden image: recipe hash, build steps, the built image and full-disk errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import ImageError
from orchestrator.images import debian, debian_tree, hostcmd, staging
from orchestrator.storage import qemuimg

GIB = 1 << 30

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# --- recipe -------------------------------------------------------------------------------

def test_recipe_hash_stable():
    first = debian.recipe_hash()
    second = debian.recipe_hash(debian.debian12_recipe())
    assert first == second
    assert len(first) == 64
    assert int(first, 16) >= 0


@pytest.mark.parametrize("change", [
    {"packages": debian.PACKAGES + ("vim-tiny",)},
    {"packages": debian.PACKAGES[:-1]},
    {"suite": "trixie"},
    {"customize_script": "#!/bin/sh\ntrue\n"},
    {"cmdline": debian.CMDLINE + " quiet"},
    {"builder_version": debian.BUILDER_VERSION + 1},
])
def test_recipe_hash_changes(change):
    recipe = debian.debian12_recipe()
    assert dataclasses.replace(recipe, **change).hash() != recipe.hash()


def test_recipe_hash_covers_files():
    recipe = debian.debian12_recipe()
    path, text = recipe.files[0]
    changed = ((path, text + "# changed\n"),) + recipe.files[1:]
    assert dataclasses.replace(recipe, files=changed).hash() != recipe.hash()


def test_recipe_has_required_files():
    names = {path for path, _ in debian.debian12_recipe().files}
    assert "etc/systemd/system/qemu-guest-agent.service.d/labctl-early.conf" in names
    assert "etc/systemd/network/80-labctl-dhcp.network" in names
    assert "etc/cloud/cloud.cfg.d/99-disable-network-config.cfg" in names
    assert "etc/hostname" in names


def test_recipe_packages_required():
    for package in ("linux-image-cloud-amd64", "cloud-init", "qemu-guest-agent",
                    "openssh-server", "systemd-sysv"):
        assert package in debian.PACKAGES


# --- host commands ----------------------------------------------------------------------

def test_run_step_failure_names_last_stderr():
    argv = ["sh", "-c", "echo noise; echo first >&2; echo 'final reason' >&2; exit 3"]
    with pytest.raises(ImageError) as caught:
        hostcmd.run_step(argv, step="testing a step")
    assert "testing a step failed" in caught.value.message
    assert caught.value.message.endswith("final reason")
    assert not isinstance(caught.value, hostcmd.NoSpaceLeft)


def test_run_step_detects_no_space():
    argv = ["sh", "-c", "echo 'write: No space left on device' >&2; exit 1"]
    with pytest.raises(hostcmd.NoSpaceLeft) as caught:
        hostcmd.run_step(argv, step="filling a disk")
    assert caught.value.step == "filling a disk"


def test_run_step_success():
    hostcmd.run_step(["true"], step="doing nothing")


def test_find_tool_missing():
    with pytest.raises(ImageError) as caught:
        hostcmd.find_tool("labctl-no-such-tool", package="nothing")
    assert "labctl-no-such-tool is not installed" in caught.value.message
    assert caught.value.fix == "run scripts/host-setup"


@needs_root
def test_build_without_mmdebstrap(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_DATA_DIR", str(tmp_path / "data"))
    # mmdebstrap is in /usr/bin, which find_tool only searches through PATH.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError) as caught:
        debian.build_debian12()
    assert "mmdebstrap is not installed" in caught.value.message
    assert caught.value.fix == "run scripts/host-setup"


# --- root tree and staging -----------------------------------------------------------------

def test_write_inside_writes_file(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    debian_tree.write_inside(tree, "etc/hostname", "localhost\n")
    written = tree / "etc" / "hostname"
    assert written.read_text() == "localhost\n"
    assert written.stat().st_mode & 0o777 == 0o644


def test_write_inside_replaces_symlink(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    outside = tmp_path / "outside.conf"
    outside.write_text("host file\n")
    (tree / "etc" / "resolv.conf").symlink_to(outside)
    debian_tree.write_inside(tree, "etc/resolv.conf", "")
    assert outside.read_text() == "host file\n"
    assert not (tree / "etc" / "resolv.conf").is_symlink()


def test_write_inside_rejects_escape(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    outside = tmp_path / "host-etc"
    outside.mkdir()
    (tree / "etc").symlink_to(outside)
    with pytest.raises(ImageError) as caught:
        debian_tree.write_inside(tree, "etc/hostname", "localhost\n")
    assert "outside the tree" in caught.value.message
    assert not (outside / "hostname").exists()


def test_staging_dir_removed_on_error(tmp_path):
    build_root = tmp_path / ".build"
    with pytest.raises(RuntimeError):
        with staging.staging_dir(build_root, "debian12") as directory:
            (directory / "tree").mkdir()
            raise RuntimeError("step failed")
    assert not directory.exists()
    assert list(build_root.iterdir()) == []


def test_mounts_under_unescapes(tmp_path, monkeypatch):
    target = tmp_path / "with space"
    escaped = str(target).replace(" ", "\\040")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"36 35 0:40 / {escaped}/proc rw,relatime - proc proc rw\n"
        "37 35 0:41 / /elsewhere rw,relatime - tmpfs tmpfs rw\n"
    )
    monkeypatch.setattr(staging, "MOUNTINFO", mountinfo)
    target.mkdir()
    assert staging.mounts_under(target) == [target.resolve() / "proc"]
    assert staging.remove_tree(target) is False
    assert target.exists()


def test_remove_stale_keeps_lock(tmp_path):
    build_root = tmp_path / ".build"
    (build_root / "debian12-abc123" / "tree").mkdir(parents=True)
    (build_root / "debian12.lock").touch()
    staging.remove_stale(build_root, "debian12")
    assert sorted(path.name for path in build_root.iterdir()) == ["debian12.lock"]


# --- full disk during a build ----------------------------------------------------------

# Runs in its own mount namespace: the tmpfs it mounts vanishes with the process and is
# never visible to the rest of the machine. The fake bootstrap puts 12 MiB in the tree, so
# mkfs.ext4 runs out of space in the 20 MiB tmpfs while copying the tree into the disk.
ENOSPC_CHILD = r"""
import json, os, subprocess, sys
from pathlib import Path

small = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "labctl-test", str(small)],
               check=True)
os.environ["LABCTL_DATA_DIR"] = str(small / "data")

from orchestrator.errors import ImageError
from orchestrator.images import debian, debian_tree

def fake_bootstrap(tree, suite, packages, *, step):
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "vmlinuz-0-test").write_bytes(b"kernel")
    (tree / "boot" / "initrd.img-0-test").write_bytes(b"initrd")
    (tree / "payload").write_bytes(os.urandom(12 << 20))

def fake_customize(tree, files, script, *, step):
    pass

debian_tree.bootstrap = fake_bootstrap
debian_tree.customize = fake_customize
phases = []
try:
    debian.build_debian12(force=True, progress=phases.append)
    result = {"message": None}
except ImageError as exc:
    result = {"message": exc.message, "where": exc.where, "fix": exc.fix}
build_root = small / "data" / "images" / ".build"
result["left"] = sorted(path.name for path in build_root.iterdir())
result["phases"] = phases
print(json.dumps(result))
"""


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap")
def test_build_full_disk(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    argv = ["unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-c", ENOSPC_CHILD, str(small)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["message"] == "no space left on device while writing the ext4 filesystem " \
                                "(mkfs.ext4)"
    assert result["where"].startswith(str(small / "data" / "images" / ".build" / "debian12-"))
    assert "free at least 2 GiB under" in result["fix"]
    assert "LABCTL_DATA_DIR" in result["fix"]
    assert result["left"] == ["debian12.lock"]
    assert result["phases"][-1].startswith("filesystem:")
    # The tmpfs was private to the child's namespace.
    assert list(small.iterdir()) == []


# --- the real image --------------------------------------------------------------------------

def _debugfs(raw: Path, request: str) -> subprocess.CompletedProcess:
    return subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True,
                          check=True)


@pytest.fixture(scope="module")
def built_image():
    cached = debian.catalog.find_by_recipe(debian.NAME, debian.recipe_hash())
    if cached is None and os.geteuid() != 0:
        pytest.skip("building the Debian image needs root")
    return debian.build_debian12()


@pytest.fixture(scope="module")
def raw_copy(built_image, tmp_path_factory):
    raw = tmp_path_factory.mktemp("debian12") / "disk.raw"
    qemuimg.convert(built_image.disk, raw, src_format="qcow2", dst_format="raw")
    yield raw
    raw.unlink()


@pytest.mark.slow
def test_image_manifest(built_image):
    manifest = json.loads((built_image.directory / "manifest.json").read_text())
    assert manifest["format"] == "qcow2"
    assert manifest["virtual_size"] == 2 * GIB
    assert manifest["recipe_hash"] == debian.recipe_hash()
    assert manifest["source"] == "build"
    assert manifest["boot"]["cmdline"].startswith("root=/dev/vda rw console=ttyS0")
    assert built_image.boot_path(built_image.boot.kernel).stat().st_size > 1 << 20
    assert built_image.boot_path(built_image.boot.initrd).stat().st_size > 1 << 20
    assert qemuimg.info(built_image.disk).virtual_size == 2 * GIB


@pytest.mark.slow
def test_image_build_is_cached(built_image):
    again = debian.build_debian12()
    assert again.ref == built_image.ref


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs debugfs (e2fsprogs)")
def test_image_is_generalized(raw_copy):
    machine_id = _debugfs(raw_copy, "stat /etc/machine-id").stdout
    assert "Type: regular" in machine_id
    assert "Size: 0\n" in machine_id
    ssh_dir = _debugfs(raw_copy, "ls /etc/ssh").stdout
    assert "sshd_config" in ssh_dir
    assert "ssh_host_" not in ssh_dir
    assert _debugfs(raw_copy, "cat /etc/hostname").stdout == "localhost\n"
    assert "File not found" in _debugfs(raw_copy, "stat /var/lib/cloud").stderr
    assert "File not found" in _debugfs(raw_copy, "stat /var/lib/systemd/random-seed").stderr
    shadow = _debugfs(raw_copy, "cat /etc/shadow").stdout.splitlines()
    root_entry = next(line for line in shadow if line.startswith("root:"))
    assert root_entry.split(":")[1].startswith("!")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs debugfs (e2fsprogs)")
def test_image_units_configured(raw_copy):
    wants = r"/etc/systemd/system/dev-virtio\x2dports-org.qemu.guest_agent.0.device.wants"
    assert "qemu-guest-agent.service" in _debugfs(raw_copy, f"ls {wants}").stdout
    timers = _debugfs(raw_copy, "ls /etc/systemd/system/timers.target.wants").stdout
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer", "fstrim.timer"):
        assert timer not in timers
    multi_user = _debugfs(raw_copy, "ls /etc/systemd/system/multi-user.target.wants").stdout
    assert "systemd-networkd.service" in multi_user
    assert "e2scrub_reap.service" not in multi_user
