"""Tests of the KVM probe: the boot sector, a real boot under TCG, and the verdict.

The verdict test expects the accelerator named by $LABCTL_TEST_ACCELERATOR. The default
is ``tcg``, for hosts where /dev/kvm exists but KVM guests hang (broken nested
virtualization), so the probe must fall back. A host with working KVM sets it to kvm.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.hosts import probe

QEMU = shutil.which("qemu-system-x86_64")
BOOT_DEADLINE = 10.0
# Seconds allowed beyond a deadline for starting and killing QEMU.
SLACK = 3.0


def test_boot_sector_size():
    sector = probe.boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"


def test_boot_sector_carries_marker():
    sector = probe.boot_sector()
    start = sector.index(probe.MARKER)
    assert sector[start + len(probe.MARKER):start + len(probe.MARKER) + 3] == b"\r\n\x00"
    # mov si, imm16 must point at the marker once the BIOS loads the sector at 0x7c00.
    load = sector.index(b"\xbe")
    assert int.from_bytes(sector[load + 1:load + 3], "little") == 0x7C00 + start


def read_serial(argv: list[str], deadline: float) -> tuple[bytes, float]:
    """Run QEMU until MARKER appears on its serial port or ``deadline`` passes; kill it by pid."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    output = b""
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        end = started + deadline
        while probe.MARKER not in output and (remaining := end - time.monotonic()) > 0:
            if not selector.select(timeout=remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            output += chunk
        return output, time.monotonic() - started
    finally:
        os.kill(process.pid, 9)
        process.wait()
        process.stdout.close()


def test_boot_sector_under_tcg(tmp_path: Path):
    assert QEMU, "qemu-system-x86_64 is missing: install qemu-system-x86 (scripts/host-setup)"
    disk = tmp_path / "probe.img"
    disk.write_bytes(probe.boot_sector())
    argv = [
        QEMU, "-accel", "tcg", "-nodefaults", "-nographic", "-no-reboot", "-nic", "none",
        "-m", "16", "-monitor", "none", "-serial", "stdio",
        "-drive", f"file={disk},format=raw,if=ide",
    ]
    output, seconds = read_serial(argv, BOOT_DEADLINE)
    assert probe.MARKER in output, output.decode(errors="replace")
    assert seconds < BOOT_DEADLINE


def test_probe_verdict():
    expected = os.environ.get("LABCTL_TEST_ACCELERATOR", "tcg")
    deadline = 4.0
    started = time.monotonic()
    result = probe.probe_local(deadline=deadline)
    elapsed = time.monotonic() - started
    assert result.accelerator == expected, result.reason
    assert result.reason
    assert elapsed < deadline + SLACK
    assert result.seconds <= elapsed


def test_probe_missing_binary(tmp_path: Path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("without /dev/kvm the probe returns before looking for QEMU")
    missing = str(tmp_path / "no-such-qemu")
    result = probe.probe_local(missing, deadline=2.0)
    assert result.accelerator == "tcg"
    assert missing in result.reason


def test_probe_failing_binary(tmp_path: Path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("without /dev/kvm the probe returns before running QEMU")
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'could not access KVM kernel module' >&2\nexit 1\n")
    fake.chmod(0o755)
    started = time.monotonic()
    result = probe.probe_local(str(fake), deadline=5.0)
    assert result.accelerator == "tcg"
    assert "could not access KVM kernel module" in result.reason
    assert time.monotonic() - started < 5.0
