"""The identity disk: a NoCloud seed ISO (volume id CIDATA) built in memory with pycdlib.

cloud-init reads ``meta-data``, ``user-data`` and (optionally) ``network-config``.
The ``labctl/`` directory carries the same identity for images without cloud-init
(the tiny test image's init reads it); cloud-init ignores it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pycdlib

VOLUME_ID = "CIDATA"


@dataclass(frozen=True)
class SeedFile:
    """One file of the seed; ``path`` is POSIX-style relative, e.g. ``labctl/identity.env``."""

    path: str
    data: bytes
    private: bool = False


@dataclass
class Seed:
    files: list[SeedFile] = field(default_factory=list)

    def add(self, path: str, data: str | bytes, *, private: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.files.append(SeedFile(path, raw, private))

    @property
    def holds_secrets(self) -> bool:
        return any(item.private for item in self.files)

    def to_iso(self) -> bytes:
        """Return the ISO 9660 image (with Rock Ridge and Joliet names, so Linux mounts show the real names)."""
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
        directories: set[str] = set()
        try:
            for item in sorted(self.files, key=lambda entry: entry.path):
                parts = item.path.split("/")
                for depth in range(1, len(parts)):
                    directory = "/".join(parts[:depth])
                    if directory not in directories:
                        iso.add_directory(
                            iso_path="/" + _iso9660_name(directory, is_dir=True),
                            rr_name=parts[depth - 1],
                            joliet_path="/" + directory,
                        )
                        directories.add(directory)
                mode = 0o100400 if item.private else 0o100444
                iso.add_fp(
                    io.BytesIO(item.data),
                    len(item.data),
                    iso_path="/" + _iso9660_name(item.path, is_dir=False),
                    rr_name=parts[-1],
                    joliet_path="/" + item.path,
                    file_mode=mode,
                )
            out = io.BytesIO()
            iso.write_fp(out)
        finally:
            iso.close()
        return out.getvalue()


def _iso9660_name(path: str, *, is_dir: bool) -> str:
    """Map a relative path onto ISO 9660 level 3 names (upper case, [A-Z0-9_], ;1 suffix)."""
    parts = path.split("/")
    mapped = []
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if last and not is_dir:
            stem, _, suffix = part.partition(".")
            name = _iso_chars(stem)[:30] + "." + _iso_chars(suffix.replace(".", "_"))[:3] + ";1"
        else:
            name = _iso_chars(part)[:31]
        mapped.append(name)
    return "/".join(mapped)


def _iso_chars(text: str) -> str:
    return "".join(ch if ch.isalnum() and ch.isascii() else "_" for ch in text.upper())
