"""A Debian kernel package unpacked on disk: its vmlinuz and the load order of its modules.

Debian's kernel packages ship no modules.dep (depmod runs in the postinst script) and a
build host may lack kmod, so dependencies are read from each module's ``.modinfo`` ELF
section. Its ``depends=`` field is written by the kernel's modpost from the same symbol
references that depmod resolves, so the order is the one modules.dep would give.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ImageError

log = logging.getLogger(__name__)

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package: release string, vmlinuz and the modules directory."""

    release: str
    vmlinuz: Path
    modules_dir: Path


def module_name(file_name: str) -> str:
    """Return the module name of a file name: ``virtio-rng.ko.xz`` -> ``virtio_rng``."""
    for suffix in _SUFFIXES:
        if file_name.endswith(suffix):
            file_name = file_name[: -len(suffix)]
            break
    return file_name.replace("-", "_")


def find_kernel(root: Path) -> Kernel:
    """Return the single kernel unpacked under ``root`` or raise ImageError."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise ImageError(
            f"expected one boot/vmlinuz-* in the kernel package, found {len(images)}",
            where=str(root),
        )
    release = images[0].name.removeprefix("vmlinuz-")
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if (base / release).is_dir():
            return Kernel(release=release, vmlinuz=images[0], modules_dir=base / release)
    raise ImageError(f"the kernel package has no modules for {release}", where=str(root))


def read_module(path: Path) -> bytes:
    """Return the ELF bytes of a module, decompressing .ko.xz, .ko.gz and .ko.zst."""
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        # Python 3.11 has no zstd module; the zstd tool ships with Debian's zstd package.
        try:
            result = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True)
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            raise ImageError(
                "decompressing a .ko.zst module failed", where=str(path), fix="install zstd"
            ) from exc
        return result.stdout
    return path.read_bytes()


def modinfo(elf: bytes) -> dict[str, str]:
    """Parse the ``.modinfo`` section of a 64-bit little-endian ELF module into key=value."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for name_offset, _type, _flags, _addr, offset, size in sections:
        start = names_offset + name_offset
        if elf[start : elf.index(b"\0", start)] == b".modinfo":
            fields = elf[offset : offset + size].split(b"\0")
            pairs = (field.decode(errors="replace").partition("=") for field in fields if field)
            return {key: value for key, _, value in pairs}
    return {}


class ModuleTree:
    """The modules of one kernel, indexed by module name, with the built-in ones known."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.files: dict[str, Path] = {}
        for path in kernel.modules_dir.rglob("*.ko*"):
            if path.name.endswith(_SUFFIXES):
                self.files[module_name(path.name)] = path
        builtin = kernel.modules_dir / "modules.builtin"
        lines = builtin.read_text().split() if builtin.exists() else []
        self.builtin = {module_name(Path(line).name) for line in lines}
        self._depends: dict[str, list[str]] = {}

    def depends(self, name: str) -> list[str]:
        """Return the modules ``name`` needs loaded first (built-in ones dropped)."""
        if name not in self._depends:
            try:
                info = modinfo(read_module(self.files[name]))
            except (ValueError, struct.error, IndexError) as exc:
                raise ImageError(
                    f"module {name} is not a readable ELF file: {exc}", where=str(self.files[name])
                ) from exc
            names = [module_name(dep) for dep in info.get("depends", "").split(",") if dep]
            self._depends[name] = [dep for dep in names if dep not in self.builtin]
        return self._depends[name]

    def load_order(self, required: Sequence[str], optional: Sequence[str] = ()) -> list[str]:
        """Return ``required`` and the present ``optional`` modules, each after its dependencies.

        Built-in modules are skipped. A required module that is neither a file nor built
        in raises ImageError, and a missing optional one is only logged.
        """
        order: list[str] = []
        for name in [module_name(item) for item in required]:
            self._missing_check(name)
            self._visit(name, order, [])
        for name in [module_name(item) for item in optional]:
            if name in self.files:
                self._visit(name, order, [])
            elif name not in self.builtin:
                log.info("optional module %s is not in kernel %s", name, self.kernel.release)
        return order

    def _missing_check(self, name: str) -> None:
        if name not in self.files and name not in self.builtin:
            raise ImageError(
                f"kernel {self.kernel.release} has no module {name}, neither as a file "
                "nor built in",
                where=str(self.kernel.modules_dir),
                fix="choose a kernel package that builds this driver",
            )

    def _visit(self, name: str, order: list[str], path: list[str]) -> None:
        if name in order or name in self.builtin:
            return
        if name in path:
            raise ImageError(f"module dependency cycle: {' -> '.join(path + [name])}")
        self._missing_check(name)
        for dep in self.depends(name):
            self._visit(dep, order, path + [name])
        order.append(name)

    def install(self, names: list[str], target: Path) -> list[str]:
        """Write ``names`` uncompressed as ``target/NAME.ko`` and return those file names.

        busybox insmod does not decompress, so every module is stored as plain ELF.
        """
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for name in names:
            (target / f"{name}.ko").write_bytes(read_module(self.files[name]))
            written.append(f"{name}.ko")
        return written
