"""qemu-img through argv lists, with its ``--output=json`` parsed (never its human text)."""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ImageError

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class ImageInfo:
    """One layer of an image as ``qemu-img info`` reports it."""

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None = None


def _run(argv: list[str], *, what: str, path: str) -> str:
    log.debug("running %s", argv)
    try:
        result = subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ImageError(
            "qemu-img is not installed", fix="install qemu-utils (scripts/host-setup does)"
        ) from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        reason = detail[-1] if detail else f"exit code {exc.returncode}"
        raise ImageError(f"{what} failed: {reason}", where=path) from exc
    return result.stdout


def _layer(entry: dict) -> ImageInfo:
    return ImageInfo(
        path=entry["filename"],
        format=entry["format"],
        virtual_size=int(entry["virtual-size"]),
        actual_size=int(entry.get("actual-size", 0)),
        backing_file=entry.get("full-backing-filename") or entry.get("backing-filename"),
        backing_format=entry.get("backing-filename-format"),
        data_file=entry.get("format-specific", {}).get("data", {}).get("data-file"),
    )


def backing_chain(path: str | Path) -> list[ImageInfo]:
    """Return the chain from ``path`` down to its base, raising ImageError if any layer is bad.

    A missing file, an unreadable or corrupt header and a missing backing file are all
    reported with the path and qemu-img's own reason.
    """
    path = str(path)
    if not Path(path).exists():
        raise ImageError("image file not found", where=path, fix="check the path")
    if not Path(path).is_file():
        # A FIFO or device would make qemu-img (and later copies) block or read forever.
        raise ImageError("image is not a regular file", where=path,
                         fix="point at a qcow2 or raw image file")
    out = _run(
        [QEMU_IMG, "info", "--output=json", "--backing-chain", "-U", path],
        what="reading the image (qemu-img info)",
        path=path,
    )
    entries = json.loads(out)
    if isinstance(entries, dict):
        entries = [entries]
    return [_layer(entry) for entry in entries]


def info(path: str | Path) -> ImageInfo:
    """Return the top layer of ``path`` after checking its whole backing chain."""
    return backing_chain(path)[0]


def check(path: str | Path) -> None:
    """Run ``qemu-img check`` on a qcow2 image; raise ImageError if it reports corruption."""
    path = str(path)
    _run([QEMU_IMG, "check", "-q", "-U", path], what="checking the image (qemu-img check)", path=path)


def convert(src: str | Path, dst: str | Path, *, src_format: str, dst_format: str = "qcow2",
            compress: bool = False) -> None:
    """Write ``src`` into a new standalone image ``dst`` (no backing file)."""
    argv = [QEMU_IMG, "convert", "-f", src_format, "-O", dst_format]
    if compress:
        argv.append("-c")
    argv += [str(src), str(dst)]
    _run(argv, what="converting the image (qemu-img convert)", path=str(src))


def create_overlay(path: str | Path, backing: str | Path, backing_format: str,
                   size: int | None = None) -> None:
    """Create a qcow2 overlay at ``path`` on an absolute ``backing`` with its format recorded."""
    backing = Path(backing)
    if not backing.is_absolute():
        raise ValueError(f"backing path must be absolute, got {backing}")
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_format,
            str(path)]
    if size is not None:
        argv.append(str(size))
    _run(argv, what="creating the overlay (qemu-img create)", path=str(path))


def rebase(path: str | Path, backing: str | Path, backing_format: str) -> None:
    """Point the qcow2 overlay ``path`` at ``backing`` without copying any data (``-u``).

    Only for a backing file with the same content as the old one, e.g. a replica of the
    same image version in another storage pool.
    """
    if not Path(backing).is_absolute():
        raise ValueError(f"backing path must be absolute, got {backing}")
    argv = [QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
            str(path)]
    _run(argv, what="re-pointing the overlay (qemu-img rebase)", path=str(path))


def snapshot_names(path: str | Path) -> list[str]:
    """Return the names of the internal snapshots of the qcow2 image ``path``.

    ``-U`` reads the header without the image lock, so a running guest's disk is listed too.
    """
    path = str(path)
    out = _run([QEMU_IMG, "info", "--output=json", "-U", path],
               what="reading the image (qemu-img info)", path=path)
    return [entry["name"] for entry in json.loads(out).get("snapshots", [])]


def apply_snapshot(path: str | Path, name: str) -> None:
    """Revert the qcow2 image ``path`` to its internal snapshot ``name`` (``snapshot -a``).

    The image must not be open: qemu-img takes its write lock.
    """
    path = str(path)
    _run([QEMU_IMG, "snapshot", "-a", name, path],
         what=f"reverting to internal snapshot {name} (qemu-img snapshot -a)", path=path)
