"""Debian packages through apt's own clients: resolve a metapackage, download, unpack.

Only ``apt-cache``, ``apt-get download`` and ``dpkg-deb -x`` are used, so nothing is
installed on the host and the archive configured in the host's apt sources is the source.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from orchestrator.errors import ImageError

log = logging.getLogger(__name__)

_UPDATE_FIX = "run 'apt-get update' as root, then build again"


def _run(argv: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    log.debug("running %s", argv)
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError(
            f"{argv[0]} is not installed, and building the tiny image needs apt and dpkg",
            fix="build on a Debian or Ubuntu host with apt and dpkg",
        ) from exc


def _last_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(("E:", "Err:"))]
    if not lines:
        lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
    return lines[-1]


def resolve_dependency(metapackage: str, prefix: str) -> str:
    """Return the first package named ``prefix...`` that ``metapackage`` depends on.

    Debian's kernel metapackages (linux-image-cloud-amd64) depend on exactly one real
    package whose name carries the ABI (linux-image-6.1.0-57-cloud-amd64).
    """
    result = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", metapackage])
    if result.returncode != 0 or not result.stdout.strip():
        raise ImageError(
            f"apt-cache found no package {metapackage}: {_last_error(result)}",
            where=metapackage,
            fix=_UPDATE_FIX,
        )
    for line in result.stdout.splitlines():
        kind, _, target = line.strip().lstrip("|").partition(":")
        target = target.strip()
        if kind == "Depends" and target.startswith(prefix) and not target.startswith("<"):
            log.debug("%s resolves to %s", metapackage, target)
            return target
    raise ImageError(
        f"package {metapackage} depends on no package named {prefix}*",
        where=metapackage,
        fix=f"check the output of 'apt-cache depends {metapackage}'",
    )


def download(package: str, directory: Path) -> Path:
    """Download ``package``'s .deb into ``directory`` with ``apt-get download`` and return it."""
    before = set(directory.glob("*.deb"))
    result = _run(["apt-get", "download", package], cwd=directory)
    if result.returncode != 0:
        reason = _last_error(result)
        fix = _UPDATE_FIX
        if "Unable to locate" not in reason and "No packages found" not in reason:
            fix = "check that this host reaches its apt archive (see /etc/apt/sources.list*)"
        raise ImageError(f"apt-get download {package} failed: {reason}", where=package, fix=fix)
    fetched = sorted(set(directory.glob(f"{package}_*.deb")) - before)
    if not fetched:
        raise ImageError(
            f"apt-get download {package} reported success but wrote no .deb",
            where=str(directory),
        )
    log.info("downloaded %s", fetched[0].name)
    return fetched[0]


def unpack(deb: Path, target: Path) -> None:
    """Extract the files of ``deb`` under ``target`` (no maintainer scripts run)."""
    target.mkdir(parents=True, exist_ok=True)
    result = _run(["dpkg-deb", "-x", str(deb), str(target)])
    if result.returncode != 0:
        raise ImageError(
            f"dpkg-deb -x failed: {_last_error(result)}",
            where=str(deb),
            fix="delete the file and build again; it may be truncated",
        )
