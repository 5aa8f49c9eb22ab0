"""Gzip'd cpio archives in the "newc" format that the Linux kernel unpacks as its initramfs.

Written in Python so that no cpio tool is needed, every entry is owned by root without
running as root, and device nodes such as /dev/console can be added without mknod.
Timestamps are zero and entries sorted, so the same tree gives the same archive.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class DeviceNode:
    """A device node to add to the archive: path inside it, mode (with S_IFCHR/S_IFBLK)."""

    path: str
    mode: int
    major: int
    minor: int


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class _Writer:
    def __init__(self, out: BinaryIO):
        self.out = out
        self.inode = 1

    def entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        self.out.write(header + encoded + _pad(len(header) + len(encoded)))
        self.out.write(data + _pad(len(data)))
        self.inode += 1


def _tree_entries(root: Path) -> list[tuple[str, Path]]:
    """Return (archive name, path) for everything under ``root``, parents before children."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(subdirs + files):
            path = Path(directory) / name
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def write_initramfs(
    root: Path, target: Path, nodes: Sequence[DeviceNode] = (), level: int = 6
) -> int:
    """Pack the tree ``root`` plus ``nodes`` into the gzip'd cpio ``target``, return its size.

    Files keep their permission bits, and every owner becomes root. Symbolic links are stored as
    links, and hard links as independent copies.
    """
    # An empty file name keeps the target's name out of the gzip header.
    with (
        open(target, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=level, mtime=0) as packed,
    ):
        writer = _Writer(packed)
        writer.entry(".", stat.S_IFDIR | 0o755)
        for name, path in _tree_entries(root):
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                writer.entry(name, info.st_mode, os.readlink(path).encode())
            elif stat.S_ISDIR(info.st_mode):
                writer.entry(name, info.st_mode)
            elif stat.S_ISREG(info.st_mode):
                writer.entry(name, info.st_mode, path.read_bytes())
            else:
                raise ValueError(f"unsupported file type (not a file, directory or link): {path}")
        for node in nodes:
            writer.entry(node.path.lstrip("/"), node.mode, rdev=(node.major, node.minor))
        writer.entry(_TRAILER, 0)
    return target.stat().st_size
