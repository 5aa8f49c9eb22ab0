"""The Debian root tree of a golden image: installed by mmdebstrap, then customized in a chroot."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from orchestrator.errors import ImageError
from orchestrator.images.hostcmd import find_tool, run_step

log = logging.getLogger(__name__)

# Commands inside the chroot get a fixed environment: the build host's locale may not exist
# in the tree, and nothing from the caller's environment should shape the image.
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}
SCRIPT_NAME = "labctl-customize.sh"


def bootstrap(tree: Path, suite: str, packages: Iterable[str], *, step: str) -> None:
    """Install ``suite`` with ``packages`` into the new directory ``tree`` (needs root).

    No mirror argument is given: mmdebstrap then uses Debian's default mirror and, for a
    stable suite, adds its -updates and -security suites. It installs no Recommends unless
    configured to, which keeps the image small.
    """
    argv = [
        find_tool("mmdebstrap", package="mmdebstrap"),
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        "--include=" + ",".join(packages),
        suite,
        str(tree),
    ]
    run_step(argv, step=step)


def customize(tree: Path, files: Iterable[tuple[str, str]], script: str, *, step: str) -> None:
    """Copy ``files`` (path in the root, text) into ``tree``, then run ``script`` in a chroot."""
    for relative, content in files:
        write_inside(tree, relative, content)
    script_path = tree / SCRIPT_NAME
    write_inside(tree, SCRIPT_NAME, script, mode=0o700)
    argv = [find_tool("chroot", package="coreutils"), str(tree), "/bin/sh", "-eu",
            f"/{SCRIPT_NAME}"]
    try:
        run_step(argv, step=step, env=CHROOT_ENV)
    finally:
        script_path.unlink(missing_ok=True)


def write_inside(tree: Path, relative: str, content: str, *, mode: int = 0o644) -> None:
    """Write a file at ``relative`` inside ``tree`` without following links out of the tree.

    An absolute symlink in the tree points at the build host's own files, so a path that
    resolves outside the tree is rejected instead of written through.
    """
    root = tree.resolve()
    target = tree / relative.lstrip("/")
    if not target.parent.resolve().is_relative_to(root):
        raise ImageError(f"cannot write {relative}: its directory resolves outside the tree",
                         where=str(tree), fix="check the symlinks in the root tree")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()
    target.write_text(content)
    target.chmod(mode)
    log.debug("wrote /%s into the root tree", relative.lstrip("/"))
