"""Host commands of an image build, run from argv lists with their output streamed to the log."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from orchestrator.errors import ImageError

log = logging.getLogger(__name__)

NO_SPACE_TEXT = "No space left on device"
# mkfs.ext4 and chroot live in sbin, which a non-login shell's PATH may lack.
SBIN_DIRS = ("/usr/sbin", "/sbin")


class NoSpaceLeft(ImageError):
    """A build step ran out of disk space. The build turns it into an error naming the fix."""

    def __init__(self, step: str):
        super().__init__(f"no space left on device while {step}")
        self.step = step


@dataclass
class _Output:
    last_stderr: str = ""
    no_space: bool = False


def is_no_space(exc: BaseException) -> bool:
    """Return True if ``exc`` reports a full disk: OSError ENOSPC or a tool's message."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return NO_SPACE_TEXT.lower() in str(exc).lower()


def find_tool(name: str, *, package: str) -> str:
    """Return the absolute path of the host command ``name`` or raise ImageError."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    found = shutil.which(name, path=search)
    if found is None:
        raise ImageError(f"{name} is not installed (Debian package {package})",
                         fix="run scripts/host-setup")
    return found


def run_step(argv: list[str], *, step: str, env: Mapping[str, str] | None = None,
             cwd: Path | None = None) -> None:
    """Run ``argv`` for the build step ``step``, logging each output line at DEBUG.

    Raises NoSpaceLeft when the command reports a full disk (even with exit code 0, since
    its output is then incomplete), else ImageError with the last stderr line.
    """
    log.debug("%s: running %s", step, argv)
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, cwd=cwd)
    except FileNotFoundError as exc:
        raise ImageError(f"{argv[0]} is not installed (needed for {step})",
                         fix="run scripts/host-setup") from exc
    output = _Output()
    try:
        returncode = _stream(process, step, output)
    finally:
        _stop(process, step)
    if output.no_space:
        raise NoSpaceLeft(step)
    if returncode != 0:
        reason = output.last_stderr or f"exit code {returncode}"
        raise ImageError(f"{step} failed: {reason}")


def _stream(process: subprocess.Popen, step: str, output: _Output) -> int:
    assert process.stdout is not None and process.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(process.stdout, step, output, False), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, step, output, True), daemon=True),
    ]
    for reader in readers:
        reader.start()
    returncode = process.wait()
    for reader in readers:
        reader.join()
    return returncode


def _pump(pipe: IO[bytes], step: str, output: _Output, is_stderr: bool) -> None:
    for raw in pipe:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if not line:
            continue
        log.debug("%s: %s", step, line)
        if NO_SPACE_TEXT.lower() in line.lower():
            output.no_space = True
        if is_stderr:
            output.last_stderr = line


def _stop(process: subprocess.Popen, step: str) -> None:
    """Terminate a command left running by an exception such as KeyboardInterrupt."""
    if process.poll() is not None:
        return
    log.warning("%s: stopping pid %d", step, process.pid)
    # SIGTERM first: mmdebstrap unmounts what it mounted inside the tree on SIGTERM.
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
