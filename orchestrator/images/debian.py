"""The Debian 12 golden image, built from Debian packages and cached by the hash of its recipe.

The build runs as root in a staging directory next to the catalog, so registering the
result is a rename. mmdebstrap installs the root tree, and a fixed script customizes and
generalizes it in a chroot. ``mkfs.ext4 -d`` then writes the tree into a raw disk, which
qemu-img compresses into a qcow2. The guest boots with direct kernel boot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import paths
from orchestrator.errors import ImageError
from orchestrator.images import catalog, debian_tree, rootfs, staging
from orchestrator.images.catalog import ImageVersion
from orchestrator.images.hostcmd import find_tool, is_no_space
from orchestrator.storage import qemuimg

log = logging.getLogger(__name__)

NAME = "debian12"
DATA_DIR = Path(__file__).with_name("debian12")
# Raise when the build steps change in a way the recipe fields do not show.
BUILDER_VERSION = 1
# With the package list below, the staging directory peaked at about 1.0 GiB (du, sampled
# every second) while the root tree and the raw disk both existed. The rest is headroom.
REQUIRED_FREE_GIB = 2

PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "qemu-guest-agent",
    "openssh-server",
    "sudo",
    "iproute2",
    "netbase",
    # The stub resolver gives clones DNS from DHCP on any NIC, hot-plugged ones included.
    "systemd-resolved",
    # resize2fs, which cloud-init's resizefs module runs when a clone's disk is larger.
    "e2fsprogs",
    # initramfs-tools compresses with zstd only when it is installed, else with gzip.
    "zstd",
)

# root= names the disk directly: there is no partition table. net.ifnames=0 names NICs
# eth0, eth1, ... in the order they appear, including hot-plugged ones.
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"


@dataclass(frozen=True)
class Recipe:
    """The inputs that decide what a build produces. Their hash is the build cache's key."""

    suite: str
    packages: tuple[str, ...]
    # The script run in a chroot, and the files copied in before it as (path, text) pairs.
    customize_script: str
    files: tuple[tuple[str, str], ...]
    cmdline: str
    disk_size: str
    filesystem_label: str
    builder_version: int

    def hash(self) -> str:
        """Return the SHA-256 hex digest over every field."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _load_files(root: Path) -> tuple[tuple[str, str], ...]:
    found = sorted(path for path in root.rglob("*") if path.is_file())
    return tuple((str(path.relative_to(root)), path.read_text()) for path in found)


def debian12_recipe() -> Recipe:
    """Return the recipe of the Debian 12 (bookworm) golden image."""
    return Recipe(
        suite="bookworm",
        packages=PACKAGES,
        customize_script=(DATA_DIR / "customize.sh").read_text(),
        files=_load_files(DATA_DIR / "files"),
        cmdline=CMDLINE,
        disk_size="2G",
        filesystem_label="labctl-root",
        builder_version=BUILDER_VERSION,
    )


def recipe_hash(recipe: Recipe | None = None) -> str:
    """Return the hash of ``recipe``, by default the Debian 12 recipe."""
    return (recipe or debian12_recipe()).hash()


def build_debian12(*, force: bool = False,
                   progress: Callable[[str], None] | None = None) -> ImageVersion:
    """Return the catalog's Debian 12 image for the current recipe, building it if needed.

    ``force`` builds again even when the catalog has an image of this recipe. ``progress``
    receives one line per build phase. A failing step raises ImageError. The staging
    directory is removed after success and failure alike, unless something is still
    mounted inside it.
    """
    report = progress or _ignore
    recipe = debian12_recipe()
    digest = recipe.hash()
    cached = None if force else catalog.find_by_recipe(NAME, digest)
    if cached is not None:
        log.info("image %s of recipe %s is already built", cached.ref, digest[:12])
        return cached
    _check_build_host()
    build_root = paths.images_dir() / ".build"
    with staging.build_lock(build_root, NAME):
        # Another process may have finished the same build while this one waited.
        cached = None if force else catalog.find_by_recipe(NAME, digest)
        if cached is not None:
            return cached
        staging.remove_stale(build_root, NAME)
        _warn_if_low_space(build_root)
        with staging.staging_dir(build_root, NAME) as directory:
            return _build(recipe, digest, directory, report)


def _ignore(message: str) -> None:
    """Discard a progress message when the caller passed no callback."""


def _check_build_host() -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "building the Debian image needs root: mmdebstrap --mode=root, chroot and "
            "file ownership in the root tree",
            fix="run the build as root",
        )
    find_tool("mmdebstrap", package="mmdebstrap")
    find_tool("mkfs.ext4", package="e2fsprogs")


def _warn_if_low_space(build_root: Path) -> None:
    free = staging.free_bytes(build_root)
    if free < REQUIRED_FREE_GIB << 30:
        log.warning("only %.1f GiB free under %s; the build needs about %d GiB",
                    free / (1 << 30), build_root, REQUIRED_FREE_GIB)


def _build(recipe: Recipe, digest: str, directory: Path,
           report: Callable[[str], None]) -> ImageVersion:
    tree = directory / "tree"
    raw = directory / "disk.raw"
    disk = directory / "disk.qcow2"
    started = time.monotonic()

    step = f"installing Debian {recipe.suite} packages (mmdebstrap)"
    with _phase("bootstrap", step, directory, report):
        debian_tree.bootstrap(tree, recipe.suite, recipe.packages, step=step)

    step = "customizing the root tree (chroot)"
    with _phase("customize", step, directory, report):
        debian_tree.customize(tree, recipe.files, recipe.customize_script, step=step)

    step = "writing the ext4 filesystem (mkfs.ext4)"
    with _phase("filesystem", step, directory, report):
        kernel, initrd = rootfs.copy_boot_files(tree, directory)
        rootfs.make_ext4(tree, raw, size=recipe.disk_size, label=recipe.filesystem_label,
                         step=step)
        # The tree is no longer needed: freeing it now lowers the build's peak disk use.
        staging.remove_tree(tree)

    step = "converting the disk to compressed qcow2 (qemu-img convert)"
    with _phase("convert", step, directory, report):
        qemuimg.convert(raw, disk, src_format="raw", dst_format="qcow2", compress=True)
        raw.unlink()

    step = "registering the image in the catalog"
    with _phase("register", step, directory, report):
        image = catalog.register(
            NAME, disk, boot_files={"kernel": kernel, "initrd": initrd}, cmdline=recipe.cmdline,
            identity="cloud-init", agent=True, recipe_hash=digest, source="build", move=True,
        )
    log.info("built %s in %.0f s (%d MiB qcow2)", image.ref, time.monotonic() - started,
             image.actual_size >> 20)
    return image


@contextmanager
def _phase(phase: str, step: str, directory: Path,
           report: Callable[[str], None]) -> Iterator[None]:
    """Report one build phase and turn its failures into ImageError naming the step."""
    report(f"{phase}: {step}")
    log.info("%s: %s", NAME, step)
    started = time.monotonic()
    try:
        yield
    except (OSError, ImageError) as exc:
        if is_no_space(exc):
            raise _no_space(step, directory) from exc
        if isinstance(exc, OSError):
            raise ImageError(f"{step} failed: {exc.strerror or exc}",
                             where=str(exc.filename or directory)) from exc
        raise
    log.debug("%s: %s took %.1f s", NAME, phase, time.monotonic() - started)


def _no_space(step: str, directory: Path) -> ImageError:
    return ImageError(
        f"no space left on device while {step}",
        where=str(directory),
        fix=f"free at least {REQUIRED_FREE_GIB} GiB under {directory.parent} "
        "or set LABCTL_DATA_DIR to a larger filesystem",
    )
