"""The local catalog of image versions.

An image version is an immutable disk file plus optional direct-boot files, stored
under ``images_dir()/NAME/VERSION/`` with a ``manifest.json``. VERSION is the first
12 hex digits of the disk's SHA-256, so ``debian12@3f9c1a2b4c5d`` names exact bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from orchestrator import paths
from orchestrator.errors import ImageError
from orchestrator.storage import qemuimg

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The same rule as the inventory's keys, so every catalog name can be used there.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
VERSION_DIGITS = 12


@dataclass(frozen=True)
class BootFiles:
    """Direct kernel boot: file names inside the version directory and the kernel command line."""

    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class ImageVersion:
    """One immutable version of a golden image as recorded in its manifest."""

    name: str
    version: str
    sha256: str
    disk: str
    format: str
    virtual_size: int
    actual_size: int
    boot: BootFiles | None
    # How the guest takes its identity: "cloud-init" reads the NoCloud seed with
    # cloud-init; "labctl-seed" is the tiny image's init reading the same seed.
    identity: str = "cloud-init"
    agent: bool = True
    recipe_hash: str | None = None
    source: str = "import"
    created: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def directory(self) -> Path:
        return Path(self.disk).parent

    def boot_path(self, file_name: str) -> Path:
        return self.directory / file_name


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_manifest(path: Path) -> ImageVersion:
    data = json.loads(path.read_text())
    boot = data.pop("boot", None)
    return ImageVersion(**data, boot=BootFiles(**boot) if boot else None)


def list_images() -> list[ImageVersion]:
    """Return every complete image version in the catalog, newest first per name."""
    root = paths.images_dir()
    found: list[ImageVersion] = []
    for manifest in sorted(root.glob(f"*/*/{MANIFEST}")):
        try:
            image = _load_manifest(manifest)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("skipping unreadable manifest %s: %s", manifest, exc)
            continue
        missing = [path for path in _files(image) if not path.exists()]
        if missing:
            log.warning("skipping image %s: %s is missing; rebuild or re-import it",
                        image.ref, missing[0])
            continue
        found.append(image)
    found.sort(key=lambda image: (image.name, image.created), reverse=False)
    return found


def _files(image: ImageVersion) -> list[Path]:
    files = [Path(image.disk)]
    if image.boot:
        files += [image.boot_path(image.boot.kernel), image.boot_path(image.boot.initrd)]
    return files


def resolve(name: str, version: str | None = None) -> ImageVersion:
    """Return the image version ``name`` (newest if ``version`` is None) or raise ImageError."""
    candidates = [image for image in list_images() if image.name == name]
    if version:
        candidates = [image for image in candidates if image.version.startswith(version)]
    if not candidates:
        known = sorted({image.ref for image in list_images()}) or ["none"]
        wanted = f"{name}@{version}" if version else name
        raise ImageError(
            f"image {wanted} is not in the catalog (known: {', '.join(known)})",
            fix=_missing_fix(name, version),
        )
    return max(candidates, key=lambda image: image.created)


def _missing_fix(name: str, version: str | None) -> str:
    """Return the command that puts image ``name`` into the catalog: only a recipe's name
    can be built; any other image is imported from its file."""
    from orchestrator.images.recipes import RECIPES  # recipes imports this module

    imported = f"'labctl image import PATH --name {name}'"
    if version:
        return (f"run 'labctl image list' for the versions there are, or import that version's "
                f"file with {imported}")
    if name in RECIPES:
        return f"run 'labctl image build {name}' or {imported}"
    return (f"run {imported} with the image's file ({name} is no recipe of labctl image "
            f"build, which knows {', '.join(sorted(RECIPES))})")


def find_by_recipe(name: str, recipe_hash: str) -> ImageVersion | None:
    """Return the cached build of ``name`` made from the recipe with this hash, if any."""
    for image in list_images():
        if image.name == name and image.recipe_hash == recipe_hash:
            return image
    return None


def register(name: str, disk: Path, *, boot_files: dict[str, Path] | None = None,
             cmdline: str | None = None, identity: str = "cloud-init", agent: bool = True,
             recipe_hash: str | None = None, source: str = "import",
             move: bool = False) -> ImageVersion:
    """Add ``disk`` (and direct-boot files) to the catalog as a new version and return it.

    The disk's backing chain is checked first; an image with a backing file is refused
    because a golden image must stand alone. ``move`` renames files into the catalog
    instead of copying them (for freshly built images on the same filesystem).
    ``boot_files`` maps "kernel" and "initrd" to paths.
    """
    if not NAME_RE.fullmatch(name):
        raise ImageError(f"invalid image name {name!r}",
                         fix="use lowercase letters, digits, '-' and '_', at most 32 characters, "
                         "starting with a letter or digit")
    chain = qemuimg.backing_chain(disk)
    top = chain[0]
    if top.data_file:
        # QEMU would open that host file for the guest: an image must not name one.
        raise ImageError(f"qcow2 image names an external data file ({top.data_file})",
                         where=str(disk), fix="convert it into a self-contained image: "
                         f"qemu-img convert -O qcow2 {disk} image.qcow2")
    if Path(disk).stat().st_size == 0:
        raise ImageError("image file is empty", where=str(disk))
    if len(chain) > 1 or top.backing_file:
        raise ImageError(
            f"image has a backing file ({top.backing_file}); golden images must stand alone",
            where=str(disk),
            fix=f"flatten it first: qemu-img convert -O qcow2 {disk} flat.qcow2",
        )
    if top.format not in ("qcow2", "raw"):
        raise ImageError(
            f"image format {top.format} is not supported (qcow2 or raw)",
            where=str(disk),
            fix=f"convert it: qemu-img convert -O qcow2 {disk} image.qcow2",
        )
    if top.format == "qcow2":
        qemuimg.check(disk)
    sha = _hash_file(Path(disk))
    version = sha[:VERSION_DIGITS]
    target = paths.images_dir() / name / version
    existing = target / MANIFEST
    if existing.exists():
        log.info("image %s@%s is already in the catalog", name, version)
        return _load_manifest(existing)
    staging = target.with_name(f".{version}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    disk_name = f"disk.{top.format}"
    _place(Path(disk), staging / disk_name, move)
    boot = None
    if boot_files:
        for role in ("kernel", "initrd"):
            _place(Path(boot_files[role]), staging / role, move)
        boot = BootFiles(kernel="kernel", initrd="initrd", cmdline=cmdline or "")
    for entry in staging.iterdir():
        entry.chmod(0o444)
    image = ImageVersion(
        name=name,
        version=version,
        sha256=sha,
        disk=str(target / disk_name),
        format=top.format,
        virtual_size=top.virtual_size,
        actual_size=os.stat(staging / disk_name).st_blocks * 512,
        boot=boot,
        identity=identity,
        agent=agent,
        recipe_hash=recipe_hash,
        source=source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    (staging / MANIFEST).write_text(json.dumps(asdict(image), indent=2) + "\n")
    os.replace(staging, target)
    log.info("registered image %s (%s)", image.ref, image.disk)
    return image


def _place(src: Path, dst: Path, move: bool) -> None:
    if move:
        os.replace(src, dst)
        return
    # cp keeps holes (shutil would fill them) and reflinks where the filesystem can.
    argv = ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)]
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        reason = exc.stderr.strip() or f"exit code {exc.returncode}"
        raise ImageError(f"copying into the catalog failed: {reason}", where=str(src),
                         fix=f"check free space under {dst.parent}") from exc
