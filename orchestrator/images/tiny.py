"""The tiny test guest image: Debian's cloud kernel and a busybox initramfs.

The guest boots by direct kernel boot in a few seconds under TCG, takes its identity
(host name, machine-id, SSH host key, root's authorized_keys) from the same NoCloud seed
ISO that cloud-init images read, and runs qemu-ga and dropbear. Its disk is a small
empty ext4 file system that /init mounts at /data, so clone tests can write to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator import paths
from orchestrator.errors import ImageError
from orchestrator.images import apt, catalog, cpio, kernel, tiny_rootfs
from orchestrator.images.catalog import ImageVersion
from orchestrator.storage import qemuimg

log = logging.getLogger(__name__)

NAME = "tiny"
# Bump when the build steps change in a way the recipe below does not show.
BUILDER_VERSION = 1
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
HOST_PACKAGES = ("busybox-static", "qemu-guest-agent", "dropbear-bin")
CMDLINE = "console=ttyS0 panic=-1"
DISK_SIZE = 64 * 1024 * 1024
DISK_LABEL = "tiny-data"

# Loaded by /init in this order, each after its dependencies. The cloud kernel builds
# virtio as modules. isofs reads the seed and ext4 the data disk (built in on Debian 12).
REQUIRED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "virtio_blk",
    "qemu_fw_cfg",
    "isofs",
    "ext4",
)
# Loaded when the kernel has them as modules: ext4's soft dependency crc32c, the drivers
# of a seed CD-ROM on an IDE (ata_piix) or virtio-scsi bus, and the ACPI power button
# (button, evdev) that busybox acpid reads.
OPTIONAL_MODULES = ("crc32c_generic", "ata_piix", "virtio_scsi", "sr_mod", "button", "evdev")

DEVICE_NODES = (
    cpio.DeviceNode("dev/console", 0o020600, 5, 1),
    cpio.DeviceNode("dev/null", 0o020666, 1, 3),
)

Progress = Callable[[str], None]


def recipe_hash() -> str:
    """Return the SHA-256 of everything the build is made from, except package versions."""
    recipe = {
        "builder": BUILDER_VERSION,
        "kernel": KERNEL_METAPACKAGE,
        "packages": list(HOST_PACKAGES),
        "modules": [list(REQUIRED_MODULES), list(OPTIONAL_MODULES)],
        "cmdline": CMDLINE,
        "disk": [DISK_SIZE, DISK_LABEL],
        "scripts": {name: tiny_rootfs.script_text(name) for name in sorted(tiny_rootfs.SCRIPTS)},
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def build_tiny(*, force: bool = False, progress: Progress | None = None) -> ImageVersion:
    """Build the tiny image and register it as "tiny", or return the cached build.

    A build with the same recipe hash is reused unless ``force`` is set. Kernel security
    updates do not change the hash (package versions are not part of it), so pass
    ``force`` to pick them up. Raises ImageError naming the failed step.
    """
    report = progress or (lambda _message: None)
    digest = recipe_hash()
    build_root = paths.ensure_private_dir(paths.images_dir() / ".build")
    with _build_lock(build_root):
        cached = None if force else catalog.find_by_recipe(NAME, digest)
        if cached is not None:
            log.info("reusing image %s (recipe %s)", cached.ref, digest[:12])
            report(f"reusing {cached.ref}")
            return cached
        staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=build_root))
        try:
            return _build(staging, digest, report)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(build_root: Path) -> Iterator[None]:
    """Serialize builds so parallel test workers wait for one build and then reuse it."""
    with open(build_root / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(staging: Path, digest: str, report: Progress) -> ImageVersion:
    started = time.monotonic()
    report("downloading the kernel package")
    unpacked = _fetch_kernel(staging)
    modules = kernel.ModuleTree(unpacked)
    order = modules.load_order(REQUIRED_MODULES, OPTIONAL_MODULES)
    log.info("kernel %s, modules in load order: %s", unpacked.release, " ".join(order))

    report("assembling the initramfs")
    root = staging / "root"
    root.mkdir()
    tiny_rootfs.assemble(root, modules, order)
    initrd = staging / "initrd"
    size = cpio.write_initramfs(root, initrd, DEVICE_NODES)
    vmlinuz = staging / "kernel"
    shutil.copyfile(unpacked.vmlinuz, vmlinuz)

    report("creating the data disk")
    disk = _make_disk(staging)
    report("registering the image")
    image = catalog.register(
        NAME,
        disk,
        boot_files={"kernel": vmlinuz, "initrd": initrd},
        cmdline=CMDLINE,
        identity="labctl-seed",
        agent=True,
        recipe_hash=digest,
        source="build",
        move=True,
    )
    elapsed = time.monotonic() - started
    log.info(
        "built %s in %.1f s (kernel %s, initramfs %.1f MiB)",
        image.ref,
        elapsed,
        unpacked.release,
        size / 2**20,
    )
    report(f"built {image.ref} in {elapsed:.1f} s, initramfs {size / 2**20:.1f} MiB")
    return image


def _fetch_kernel(staging: Path) -> kernel.Kernel:
    package = apt.resolve_dependency(KERNEL_METAPACKAGE, "linux-image-")
    downloads = staging / "debs"
    downloads.mkdir()
    deb = apt.download(package, downloads)
    target = staging / "kernel-package"
    apt.unpack(deb, target)
    deb.unlink()
    return kernel.find_kernel(target)


def _make_disk(staging: Path) -> Path:
    """Create the 64 MiB qcow2 data disk containing an empty ext4 file system."""
    empty = staging / "empty"
    empty.mkdir()
    raw = staging / "disk.raw"
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        DISK_LABEL,
        "-E",
        "root_owner=0:0",
        "-d",
        str(empty),
        str(raw),
        f"{DISK_SIZE // 2**20}M",
    ]
    log.debug("running %s", argv)
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ImageError("mkfs.ext4 is not installed", fix="apt-get install e2fsprogs") from exc
    except subprocess.CalledProcessError as exc:
        raise ImageError(f"mkfs.ext4 failed: {exc.stderr.strip()}", where=str(raw)) from exc
    disk = staging / "disk.qcow2"
    qemuimg.convert(raw, disk, src_format="raw")
    raw.unlink()
    return disk
