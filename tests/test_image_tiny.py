"""Tests of the tiny image: the recipe, the initramfs writer, the build and real boots.

The boot tests run QEMU directly under TCG with 128 MiB (they test the image, not
libvirt), each guest taking about 5 s to its agent. The build reuses the cached image
from the catalog when the recipe is unchanged.
"""

from __future__ import annotations

import gzip
import re
import stat
import subprocess
import time
from pathlib import Path

import guestkit
import pytest

from orchestrator.errors import ImageError
from orchestrator.images import apt, catalog, cpio, kernel, tiny, tiny_rootfs
from orchestrator.storage import qemuimg

BOOT_TIMEOUT = 30.0


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """Parse a newc cpio archive into name -> (mode, data, (rdev major, rdev minor))."""
    entries = {}
    position = 0
    while True:
        header = data[position : position + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = position + 110
        name = data[name_start : name_start + name_size - 1].decode()
        body_start = (name_start + name_size + 3) & ~3
        body = data[body_start : body_start + size]
        position = (body_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (fields[9], fields[10]))


# Recipe and initramfs writer (no QEMU, no network).


def test_recipe_hash_stable():
    first = tiny.recipe_hash()
    assert first == tiny.recipe_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_recipe_hash_follows_init(monkeypatch):
    before = tiny.recipe_hash()
    original = tiny_rootfs.script_text
    monkeypatch.setattr(tiny_rootfs, "script_text", lambda name: original(name) + "# changed\n")
    assert tiny.recipe_hash() != before


def test_module_name_normalized():
    assert kernel.module_name("virtio-rng.ko") == "virtio_rng"
    assert kernel.module_name("ext4.ko.xz") == "ext4"
    assert kernel.module_name("sr_mod.ko.zst") == "sr_mod"


def test_cpio_roundtrip(tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho odd-length\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "alias").symlink_to("/bin/tool")
    (root / "dev").mkdir()
    archive = tmp_path / "initrd"
    node = cpio.DeviceNode("dev/console", 0o020600, 5, 1)
    cpio.write_initramfs(root, archive, [node])

    entries = read_newc(gzip.decompress(archive.read_bytes()))
    assert entries["bin/tool"][1] == b"#!/bin/sh\necho odd-length\n"
    assert stat.S_IMODE(entries["bin/tool"][0]) == 0o755
    assert stat.S_ISLNK(entries["bin/alias"][0])
    assert entries["bin/alias"][1] == b"/bin/tool"
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["dev/console"][2] == (5, 1)
    assert list(entries).index("bin") < list(entries).index("bin/tool")


def test_cpio_reproducible(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_text("same\n")
    cpio.write_initramfs(root, tmp_path / "one")
    (root / "file").touch()
    cpio.write_initramfs(root, tmp_path / "two")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()


def fake_command(directory: Path, name: str, stderr: str, code: int) -> None:
    """Write an executable ``name`` that prints ``stderr`` and exits with ``code``."""
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {code}\n")
    script.chmod(0o755)


def test_apt_missing_lists_fix(tmp_path, monkeypatch):
    fake_command(tmp_path / "bin", "apt-cache", "E: No packages found", 100)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(ImageError) as caught:
        apt.resolve_dependency("linux-image-cloud-amd64", "linux-image-")
    assert "No packages found" in caught.value.message
    assert "apt-get update" in caught.value.fix


def test_apt_download_offline_fix(tmp_path, monkeypatch):
    reason = "E: Failed to fetch a.deb  Temporary failure resolving the archive"
    fake_command(tmp_path / "bin", "apt-get", reason, 100)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(ImageError) as caught:
        apt.download("linux-image-6.1.0-57-cloud-amd64", tmp_path)
    assert "Temporary failure resolving" in caught.value.message
    assert "reaches its apt archive" in caught.value.fix


def test_build_failure_removes_staging(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_DATA_DIR", str(tmp_path / "data"))

    def fail(metapackage: str, prefix: str) -> str:
        raise ImageError("simulated apt failure")

    monkeypatch.setattr(apt, "resolve_dependency", fail)
    with pytest.raises(ImageError, match="simulated"):
        tiny.build_tiny()
    assert list((tmp_path / "data" / "images" / ".build").glob("tiny-*")) == []
    assert catalog.find_by_recipe("tiny", tiny.recipe_hash()) is None


# The build (downloads the kernel package on the first run).


@pytest.fixture(scope="session")
def tiny_image() -> catalog.ImageVersion:
    return tiny.build_tiny()


@pytest.fixture(scope="session")
def initramfs(tiny_image) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    return read_newc(gzip.decompress(tiny_image.boot_path("initrd").read_bytes()))


def test_build_registers_tiny(tiny_image):
    assert tiny_image.name == "tiny"
    assert tiny_image.identity == "labctl-seed"
    assert tiny_image.boot is not None
    assert tiny_image.boot_path(tiny_image.boot.kernel).stat().st_size > 1_000_000
    assert tiny_image.boot_path(tiny_image.boot.initrd).stat().st_size > 1_000_000
    assert "console=ttyS0" in tiny_image.boot.cmdline
    assert tiny_image.virtual_size == 64 * 1024 * 1024


def test_build_reused_by_recipe(tiny_image):
    assert catalog.find_by_recipe("tiny", tiny.recipe_hash()) == tiny_image
    assert tiny.build_tiny() == tiny_image


def test_build_leaves_no_staging(tiny_image):
    build_root = Path(tiny_image.disk).parents[2] / ".build"
    assert list(build_root.glob("tiny-*")) == []


def test_initramfs_size(tiny_image):
    assert tiny_image.boot_path("initrd").stat().st_size < 16 * 1024 * 1024


def test_initramfs_has_programs(initramfs):
    for path in (
        "init",
        "bin/busybox",
        "usr/sbin/qemu-ga",
        "usr/sbin/dropbear",
        "usr/bin/dropbearconvert",
        "usr/bin/dropbearkey",
        "sbin/shutdown",
        "lib64/ld-linux-x86-64.so.2",
        "dev/console",
    ):
        assert path in initramfs, path
    for applet in ("bin/sh", "bin/cat", "bin/hostname", "sbin/ip", "sbin/hwclock"):
        assert initramfs[applet][1] == b"/bin/busybox", applet


def test_initramfs_module_order(initramfs):
    order = initramfs["etc/labctl-tiny/modules"][1].decode().split()
    for module in ("virtio_pci", "virtio_net", "virtio_console", "virtio_blk", "isofs"):
        assert f"{module}.ko" in order, module
    assert order.index("virtio_ring.ko") < order.index("virtio_pci.ko")
    assert order.index("net_failover.ko") < order.index("virtio_net.ko")
    for name in order:
        assert initramfs[f"lib/modules/labctl/{name}"][1][:4] == b"\x7fELF", name


def test_modinfo_depends(initramfs):
    info = kernel.modinfo(initramfs["lib/modules/labctl/virtio_net.ko"][1])
    assert "net_failover" in info["depends"].split(",")
    assert info["name"] == "virtio_net"


# Booting the image directly with QEMU.


@pytest.fixture
def boot(tiny_image, tmp_path):
    """Return a function that boots the image on a fresh overlay, stopping every guest after."""
    guests = []

    def start(seed: guestkit.Seed | None = None, seed_bus: str = "virtio") -> guestkit.Guest:
        workdir = tmp_path / f"guest{len(guests)}"
        workdir.mkdir()
        overlay = workdir / "overlay.qcow2"
        qemuimg.create_overlay(overlay, tiny_image.disk, "qcow2")
        iso = guestkit.write_seed_iso(workdir / "seed.iso", seed.files()) if seed else None
        guest = guestkit.Guest(
            workdir,
            kernel=tiny_image.boot_path("kernel"),
            initrd=tiny_image.boot_path("initrd"),
            cmdline=tiny_image.boot.cmdline,
            disk=overlay,
            seed=iso,
            seed_bus=seed_bus,
        )
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        guest.stop()


def make_seed(**overrides) -> guestkit.Seed:
    values = dict(
        hostname="desk-07",
        machine_id="0123456789abcdef0123456789abcdef",
        instance_id="i-desk-07-1",
        host_key=guestkit.make_key_pair("host"),
        client_key=guestkit.make_key_pair("client"),
    )
    values.update(overrides)
    return guestkit.Seed(**values)


def test_boot_seed_identity(boot):
    seed = make_seed()
    guest = boot(seed)
    guest.agent.wait(BOOT_TIMEOUT)
    assert guest.agent.run(["hostname"]) == (0, "desk-07\n")
    assert guest.agent.run(["cat", "/etc/hostname"]) == (0, "desk-07\n")
    assert guest.agent.run(["cat", "/etc/machine-id"]) == (0, seed.machine_id + "\n")
    guest.wait_console(r"labctl-tiny: ready hostname=desk-07", BOOT_TIMEOUT)


def test_boot_seed_ssh_host_key(boot):
    seed = make_seed()
    guest = boot(seed)
    client = guest.ssh(seed.client_key, timeout=BOOT_TIMEOUT)
    try:
        presented = client.get_transport().get_remote_server_key()
        algorithm, blob = seed.host_key.public.split()[:2]
        assert presented.get_name() == algorithm
        assert presented.get_base64() == blob
        _, stdout, _ = client.exec_command("hostname")
        assert stdout.read().decode() == "desk-07\n"
    finally:
        client.close()


def test_boot_seed_on_ide_cdrom(boot):
    guest = boot(make_seed(hostname="desk-cd"), seed_bus="ide")
    guest.agent.wait(BOOT_TIMEOUT)
    assert guest.agent.run(["hostname"]) == (0, "desk-cd\n")


def test_boot_without_seed(boot):
    guest = boot()
    guest.agent.wait(BOOT_TIMEOUT)
    assert guest.agent.run(["hostname"]) == (0, "tiny\n")
    code, machine_id = guest.agent.run(["cat", "/etc/machine-id"])
    assert code == 0
    assert re.fullmatch(r"[0-9a-f]{32}\n", machine_id)


def test_boot_rejects_bad_seed(boot):
    seed = make_seed(hostname="meta-host")
    # identity.env contains shell syntax, which /init must ignore, using meta-data instead.
    unsafe = b"LABCTL_HOSTNAME=$(poweroff)\nLABCTL_MACHINE_ID=`reboot`\nLABCTL_INSTANCE_ID=x;y\n"
    seed.extra_files["labctl/identity.env"] = unsafe
    seed.extra_files["labctl/ssh_host_ed25519_key"] = b"not a key\n"
    guest = boot(seed)
    guest.wait_console(r"labctl-tiny: ready hostname=meta-host", BOOT_TIMEOUT)
    assert guest.agent.run(["hostname"]) == (0, "meta-host\n")
    code, machine_id = guest.agent.run(["cat", "/etc/machine-id"])
    assert code == 0
    assert re.fullmatch(r"[0-9a-f]{32}\n", machine_id)
    assert machine_id != seed.machine_id + "\n"
    console = guest.console_text()
    assert "ignoring LABCTL_HOSTNAME" in console
    assert "converting the seed's SSH host key failed" in console
    # dropbear runs with a generated key instead.
    client = guest.ssh(seed.client_key, timeout=BOOT_TIMEOUT)
    try:
        presented = client.get_transport().get_remote_server_key()
        assert presented.get_base64() != seed.host_key.public.split()[1]
    finally:
        client.close()


def test_boot_hotplug_nic_dhcp(boot):
    guest = boot(make_seed())
    guest.agent.wait(BOOT_TIMEOUT)
    nic = guestkit.Nic("n1", "52:54:00:7e:00:02", guestkit.free_port(), "10.0.3.0/24")
    guest.hotplug_nic(nic)
    deadline = time.monotonic() + 15
    addresses: list[str] = []
    while not addresses and time.monotonic() < deadline:
        for interface in guest.agent.execute("guest-network-get-interfaces"):
            if interface.get("hardware-address") == nic.mac:
                addresses = [
                    address["ip-address"]
                    for address in interface.get("ip-addresses", [])
                    if address["ip-address-type"] == "ipv4"
                ]
        time.sleep(0.3)
    assert addresses == ["10.0.3.15"]


def test_guest_set_time(boot):
    guest = boot()
    guest.agent.wait(BOOT_TIMEOUT)
    target = time.time_ns() + 3600 * 10**9
    assert guest.agent.execute("guest-set-time", time=target) == {}
    code, output = guest.agent.run(["date", "+%s"])
    assert code == 0
    assert abs(int(output) - target // 10**9) < 30


def test_data_persists_after_shutdown(boot, tmp_path):
    guest = boot()
    guest.agent.wait(BOOT_TIMEOUT)
    code, _ = guest.agent.run(["sh", "-c", "echo kept > /data/marker"])
    assert code == 0
    guest.agent.send_only("guest-shutdown")
    assert guest.wait_exit(BOOT_TIMEOUT) == 0
    raw = tmp_path / "data.raw"
    qemuimg.convert(guest.disk, raw, src_format="qcow2", dst_format="raw")
    result = subprocess.run(
        ["debugfs", "-R", "cat /marker", str(raw)], capture_output=True, text=True, check=True
    )
    assert result.stdout == "kept\n"


def test_acpi_powerdown_stops_guest(boot):
    guest = boot()
    guest.wait_console(r"labctl-tiny: ready hostname=tiny", BOOT_TIMEOUT)
    guest.qmp.execute("system_powerdown")
    assert guest.wait_exit(BOOT_TIMEOUT) == 0
    assert "labctl-tiny: stopping: poweroff" in guest.console_text()
