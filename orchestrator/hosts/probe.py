"""Deciding kvm or tcg by booting real guest code under KVM with a deadline.

Opening /dev/kvm and its ioctls can succeed on hosts where guests then hang (broken
nested virtualization), and libvirt's capabilities list kvm there too. So the probe
boots a 512-byte boot sector under ``-accel kvm`` that prints a marker on the serial
port: KVM counts as usable only if the marker appears before the deadline.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = b"labctl-kvm-probe-ok"
DEFAULT_DEADLINE = 10.0


def boot_sector() -> bytes:
    """Return a boot sector that writes MARKER to COM1 and halts (16-bit real mode)."""
    prologue = bytes([
        0x31, 0xC0,        # xor ax, ax
        0x8E, 0xD8,        # mov ds, ax
        0xFC,              # cld
        0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    ])
    loop = bytes([
        0xAC,              # next: lodsb
        0x84, 0xC0,        # test al, al
        0x74, 0x03,        # jz done
        0xEE,              # out dx, al
        0xEB, 0xF8,        # jmp next
        0xFA,              # done: cli
        0xF4,              # hlt
        0xEB, 0xFD,        # jmp hlt
    ])
    load_size = 3  # mov si, imm16
    address = 0x7C00 + len(prologue) + load_size + len(loop)
    load = bytes([0xBE, address & 0xFF, address >> 8])
    code = prologue + load + loop + MARKER + b"\r\n\x00"
    sector = bytearray(512)
    sector[: len(code)] = code
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


@dataclass(frozen=True)
class ProbeResult:
    accelerator: str  # "kvm" or "tcg"
    reason: str
    seconds: float


def probe_local(qemu: str | None = None, *, deadline: float = DEFAULT_DEADLINE) -> ProbeResult:
    """Boot the probe sector with the local QEMU under KVM; return kvm or tcg and why."""
    start = time.monotonic()
    if not os.path.exists("/dev/kvm"):
        return ProbeResult("tcg", "/dev/kvm does not exist", 0.0)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ProbeResult("tcg", "/dev/kvm is not readable and writable", 0.0)
    binary = qemu or shutil.which("qemu-system-x86_64")
    if not binary:
        return ProbeResult("tcg", "qemu-system-x86_64 is not installed", 0.0)
    with tempfile.TemporaryDirectory(prefix="labctl-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(boot_sector())
        argv = [
            binary, "-accel", "kvm", "-nodefaults", "-nographic", "-no-reboot",
            "-m", "16", "-monitor", "none", "-serial", "stdio",
            "-drive", f"file={disk},format=raw,if=ide",
        ]
        log.debug("probing KVM: %s", argv)
        found, detail = _run_until_marker(argv, deadline)
    seconds = time.monotonic() - start
    if found:
        return ProbeResult("kvm", f"a guest booted under KVM in {seconds:.2f} s", seconds)
    return ProbeResult("tcg", detail, seconds)


def _run_until_marker(argv: list[str], deadline: float) -> tuple[bool, str]:
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except OSError as exc:
        return False, f"cannot run {argv[0]}: {exc.strerror}"
    output = b""
    closed = False
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        end = time.monotonic() + deadline
        while (remaining := end - time.monotonic()) > 0:
            if not selector.select(timeout=remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)  # type: ignore[union-attr]
            if not chunk:
                closed = True
                break
            output += chunk
            if MARKER in output:
                return True, "marker seen"
        # End of output means QEMU is exiting, even while poll() still returns None.
        if closed or process.poll() is not None:
            text = output.decode(errors="replace").strip().splitlines()
            return False, f"QEMU with -accel kvm failed: {text[-1] if text else 'no output'}"
        return False, f"a guest under KVM printed nothing within {deadline:.0f} s (KVM hangs)"
    finally:
        process.kill()
        process.wait()


def main() -> int:
    """Print the probe's verdict; exit 0 when KVM works (used by scripts/host-setup)."""
    result = probe_local()
    print(f"{result.accelerator}: {result.reason}")
    return 0 if result.accelerator == "kvm" else 1


if __name__ == "__main__":
    raise SystemExit(main())
