"""Copy programs installed on the build host, with the shared libraries ldd lists, into a tree.

The tiny image reuses the host's Debian builds of busybox-static, qemu-guest-agent and
dropbear-bin instead of downloading and unpacking each library package. This works
because the host and the guest are both x86-64 glibc systems and ldd lists every library.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from orchestrator.errors import ImageError

log = logging.getLogger(__name__)

# "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+) \(0x[0-9a-f]+\)$")
_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_program(name: str, package: str) -> Path:
    """Return the absolute path of ``name`` (sbin directories included) or raise ImageError."""
    found = shutil.which(name, path=_SEARCH_PATH)
    if found is None:
        raise ImageError(
            f"{name} is not installed on this host, and the tiny image copies it from there",
            fix=f"apt-get install {package} (scripts/host-setup installs it)",
        )
    return Path(found)


def shared_libraries(program: Path) -> list[Path]:
    """Return the shared libraries and the ELF interpreter that ldd lists for ``program``.

    A static program gives an empty list, and an unresolved library raises ImageError.
    """
    result = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in result.stdout + result.stderr:
        return []
    if result.returncode != 0:
        raise ImageError(f"ldd failed: {result.stderr.strip()}", where=str(program))
    libraries = []
    for line in result.stdout.splitlines():
        if "=> not found" in line:
            raise ImageError(
                f"library {line.split()[0]} not found by ldd",
                where=str(program),
                fix="reinstall the package that provides the program",
            )
        match = _LDD_LINE.match(line)
        if match and match.group(2).startswith("/"):
            libraries.append(Path(match.group(2)))
    return libraries


def install_program(program: Path, root: Path, destination: str) -> list[str]:
    """Copy ``program`` to ``root/destination`` and its libraries to their paths under ``root``.

    Each library is stored as a regular file under the path ldd printed (the soname
    path), so the guest needs neither symbolic links nor an ld.so cache. Returns the
    paths written, relative to ``root``.
    """
    written = [destination]
    _copy(program, root / destination, 0o755)
    for library in shared_libraries(program):
        relative = library.as_posix().lstrip("/")
        if not (root / relative).exists():
            _copy(library, root / relative, 0o755)
            written.append(relative)
    log.debug("copied %s with %d libraries", program, len(written) - 1)
    return written


def _copy(source: Path, target: Path, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(os.path.realpath(source), target)
    target.chmod(mode)
