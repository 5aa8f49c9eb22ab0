"""A root tree made into a raw ext4 disk plus the kernel and initramfs for direct kernel boot."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from orchestrator.errors import ImageError
from orchestrator.images.hostcmd import find_tool, run_step

log = logging.getLogger(__name__)


def make_ext4(tree: Path, raw: Path, *, size: str, label: str, step: str) -> None:
    """Write a new raw disk ``raw`` of ``size`` (mkfs units, e.g. "2G") holding ``tree``.

    ``mkfs.ext4 -d`` copies the tree into the new filesystem itself, so the build needs
    neither a loop device nor a mount. The file is sparse: only written blocks use space.
    """
    argv = [find_tool("mkfs.ext4", package="e2fsprogs"), "-q", "-L", label, "-d", str(tree),
            str(raw), size]
    run_step(argv, step=step)


def copy_boot_files(tree: Path, destination: Path) -> tuple[Path, Path]:
    """Copy the tree's only kernel and its initramfs to ``destination``; return both paths."""
    boot = tree / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        names = ", ".join(kernel.name for kernel in kernels) or "none"
        raise ImageError(f"expected exactly one kernel in /boot, found: {names}", where=str(boot),
                         fix="install exactly one linux-image package in the recipe")
    kernel = kernels[0]
    initrd = boot / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    copies = []
    for source, name in ((kernel, "kernel"), (initrd, "initrd")):
        # A symlink in the tree may point at the build host's own /boot.
        if source.is_symlink() or not source.is_file():
            raise ImageError(f"{source.name} is missing or not a regular file", where=str(boot),
                             fix="check that the kernel package installed and ran update-initramfs")
        target = destination / name
        shutil.copyfile(source, target)
        copies.append(target)
    log.debug("copied %s and %s out of the tree", kernel.name, initrd.name)
    return copies[0], copies[1]
