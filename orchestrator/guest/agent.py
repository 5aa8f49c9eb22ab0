"""The QEMU guest agent through libvirt (virDomainQemuAgentCommand).

Every call has a timeout, and waits name what they waited for in their GuestTimeout.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from orchestrator import cancel
from orchestrator.errors import GuestError, GuestTimeout

log = logging.getLogger(__name__)

# Seconds one agent command may take before libvirt gives up on it.
COMMAND_TIMEOUT = 10


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


def command(domain: libvirt.virDomain, execute: str, arguments: dict | None = None,
            *, timeout: int = COMMAND_TIMEOUT) -> object:
    """Send one agent command and return its ``return`` value; libvirt errors become GuestError."""
    request: dict[str, object] = {"execute": execute}
    if arguments is not None:
        request["arguments"] = arguments
    try:
        reply = libvirt_qemu.qemuAgentCommand(domain, json.dumps(request), timeout, 0)
    except libvirt.libvirtError as exc:
        raise GuestError(
            f"guest agent command {execute} failed: {exc.get_error_message()}",
            where=domain.name(),
        ) from exc
    return json.loads(reply).get("return")


def wait_for_agent(domain: libvirt.virDomain, *, timeout: float, poll: float = 0.5) -> float:
    """Wait until guest-ping succeeds; return the seconds waited or raise GuestTimeout."""
    start = time.monotonic()
    deadline = start + timeout
    last_error = "no answer yet"
    while True:
        if not domain.isActive():
            raise GuestError(
                "domain stopped while waiting for the guest agent", where=domain.name(),
                fix="read the console log for why the guest stopped",
            )
        try:
            command(domain, "guest-ping", timeout=2)
            return time.monotonic() - start
        except GuestError as exc:
            last_error = exc.message
        if time.monotonic() >= deadline:
            raise GuestTimeout(
                f"guest agent did not respond to guest-ping within {timeout:.0f} s "
                f"(last error: {last_error})",
                where=domain.name(),
                fix="check that the image runs qemu-guest-agent on the "
                "org.qemu.guest_agent.0 port, and read the console log",
            )
        cancel.sleep(poll)


def run(domain: libvirt.virDomain, argv: list[str], *, timeout: float = 30,
        stdin: bytes | None = None) -> ExecResult:
    """Run ``argv`` in the guest (no shell) and return its exit code and captured output."""
    return wait_exec(domain, spawn(domain, argv, stdin=stdin), argv[0], timeout=timeout)


def spawn(domain: libvirt.virDomain, argv: list[str], *, stdin: bytes | None = None) -> int:
    """Start ``argv`` in the guest (no shell) with output captured; return its guest pid."""
    arguments: dict[str, object] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if stdin is not None:
        arguments["input-data"] = base64.b64encode(stdin).decode()
    started = command(domain, "guest-exec", arguments)
    return int(started["pid"])  # type: ignore[index]


def wait_exec(domain: libvirt.virDomain, pid: int, program: str, *,
              timeout: float) -> ExecResult:
    """Wait for a command started by ``spawn`` and return its exit code and output."""
    deadline = time.monotonic() + timeout
    # Short commands finish within milliseconds: poll fast first, then every 0.1 s.
    poll = 0.005
    while True:
        status = command(domain, "guest-exec-status", {"pid": pid})
        if status.get("exited"):  # type: ignore[union-attr]
            return ExecResult(
                exit_code=int(status.get("exitcode", -1)),  # type: ignore[union-attr]
                stdout=_decode(status.get("out-data")),  # type: ignore[union-attr]
                stderr=_decode(status.get("err-data")),  # type: ignore[union-attr]
            )
        if time.monotonic() >= deadline:
            raise GuestTimeout(
                f"command {program} did not finish within {timeout:.0f} s in the guest",
                where=domain.name(),
            )
        cancel.sleep(poll)
        poll = min(0.1, poll * 2)


def check_output(domain: libvirt.virDomain, argv: list[str], *, timeout: float = 30) -> str:
    """Run ``argv`` in the guest and return stdout, raising GuestError on a non-zero exit."""
    result = run(domain, argv, timeout=timeout)
    if result.exit_code != 0:
        detail = result.stderr.strip().splitlines()
        raise GuestError(
            f"{' '.join(argv)} exited with {result.exit_code} in the guest"
            + (f": {detail[-1]}" if detail else ""),
            where=domain.name(),
        )
    return result.stdout


def set_time(domain: libvirt.virDomain) -> None:
    """Step the guest clock to the host's (guest-set-time with the host's nanoseconds)."""
    command(domain, "guest-set-time", {"time": time.time_ns()})


def clock_offset(domain: libvirt.virDomain) -> float:
    """Return the guest clock minus the host clock in seconds (guest-get-time)."""
    before = time.time_ns()
    guest = int(command(domain, "guest-get-time"))  # type: ignore[arg-type]
    after = time.time_ns()
    return (guest - (before + after) / 2) / 1e9


def write_file(domain: libvirt.virDomain, path: str, data: bytes, *,
               mode: str | None = "644") -> None:
    """Write ``data`` to ``path`` in the guest with permission bits ``mode`` (octal).

    The file is created empty and given its mode before anything is written, so a
    private key is never readable by others, not even for a moment. ``mode=None``
    writes to an existing file or device as it is (/dev/urandom, /proc/sys).
    """
    if mode is not None:
        check_output(domain, ["touch", path])
        check_output(domain, ["chmod", mode, path])
    handle = command(domain, "guest-file-open", {"path": path, "mode": "w"})
    try:
        command(domain, "guest-file-write",
                {"handle": handle, "buf-b64": base64.b64encode(data).decode()})
    finally:
        command(domain, "guest-file-close", {"handle": handle})


def _decode(data: object) -> str:
    if not data:
        return ""
    return base64.b64decode(str(data)).decode(errors="replace")
