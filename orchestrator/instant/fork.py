"""Instant clones by QEMU VM templating: children continue from a paused parent's RAM file.

The parent runs with its RAM in a file under RAM_DIR (memory-backend-file, share=on).
Once it is paused, its device state is saved with the migration capability
x-ignore-shared, so the state file contains the devices but no page of the RAM file. Each
child maps the same file copy-on-write (share=off), starts paused with ``-incoming
defer`` and takes the device state in through the monitor. It then continues from the
parent's memory without booting, and its memory pages stay shared with the file until
the child writes them.

libvirt 9.0 has no API for any of this. The memory backend and ``-incoming`` are QEMU
arguments in the domain's <qemu:commandline>, and the migration runs through the
monitor passthrough of libvirt_qemu, so libvirt marks these domains tainted
(custom-argv, custom-monitor). Every child reads the RAM file wherever it has not
written yet, so the file must not change while a child runs: never start the parent
with parent_args on it again.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import logging
import os
import pwd
import re
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any

import libvirt
import libvirt_qemu

from orchestrator import cancel
from orchestrator.errors import LabctlError
from orchestrator.hosts.connection import is_local

log = logging.getLogger(__name__)

RAM_DIR = "/dev/shm/labctl"  # tmpfs, where QEMU (user libvirt-qemu) creates the RAM files

# libvirt 9.0 already gives every domain its own backend, "-object memory-backend-ram,
# id=pc.ram" with "-machine memory-backend=pc.ram", so a second object named pc.ram
# fails ("attempt to add duplicate property 'pc.ram'"). Ours has its own id, and our
# later "-machine memory-backend=ID" wins, because QEMU merges repeated -machine options.
# libvirt's pc.ram then backs nothing: the guest does not see it, and it is not in the
# migration stream (RAM total 520 KiB for a 128 MiB guest, QEMU 7.2). The id is also the
# RAM block's name in the migration stream, so parent and child must use the same one.
MEMORY_BACKEND_ID = "labctl-ram"

# Files of the local system daemon's QEMU driver, the only libvirtd that fork supports.
QEMU_CONF = "/etc/libvirt/qemu.conf"
QEMU_LOG_DIR = "/var/log/libvirt/qemu"

# The name under which the state file's descriptor is handed to QEMU (QMP getfd).
STATE_FD_NAME = "labctl-state"

# virDomainQemuMonitorCommandWithFiles exists since libvirt 8.2.0.
MIN_LIBVIRT_VERSION = 8_002_000

# A QEMU migration stream starts with QEMU_VM_FILE_MAGIC "QEVM" and version 3.
STREAM_HEADER = b"QEVM\x00\x00\x00\x03"

STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended by the guest",
}

KEY_RE = re.compile(r"[a-z0-9-]+")
# QEMU's messages in the domain log: "2026-01-31T12:00:00.123456Z qemu-system-x86_64: text".
QEMU_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z [^:\s]+: (.*)$", re.MULTILINE)
MIB = 1 << 20


class ForkError(LabctlError):
    """A fork step failed: the RAM directory, a parent's state save or a child's load."""


def ram_path(key: str) -> str:
    """RAM file of the parent `key` (key: [a-z0-9-]+, validated)."""
    if not KEY_RE.fullmatch(key):
        raise ForkError(
            f"invalid parent key {key!r}: it must match [a-z0-9-]+",
            fix="derive the key from lowercase letters, digits and hyphens",
        )
    return f"{RAM_DIR}/{key}.ram"


def prepare_ram_dir() -> None:
    """Create RAM_DIR owned by the QEMU user (see ``qemu_user``), with a mode that lets
    QEMU create files there. Calling it again changes nothing.

    The mode is 0700, because RAM files contain guest memory and no other user may list
    or read them. RAM_DIR is in the world-writable /dev/shm, so a symlink or another
    user's directory found at its path is rejected, never adopted.
    """
    uid, gid = qemu_user()
    try:
        os.mkdir(RAM_DIR, 0o700)
        log.info("created RAM directory %s for instant clones", RAM_DIR)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ForkError(f"cannot create {RAM_DIR}: {exc.strerror}", where=RAM_DIR,
                        fix="check that /dev/shm exists and is writable by root") from exc
    try:
        descriptor = os.open(RAM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ForkError(f"{RAM_DIR} is not a directory: {exc.strerror}", where=RAM_DIR,
                        fix=f"remove {RAM_DIR}; labctl creates it again") from exc
    try:
        _own_directory(descriptor, uid, gid)
    finally:
        os.close(descriptor)


def create_ram_file(path: str) -> None:
    """Create a parent's RAM file empty, mode 0600 and owned by the QEMU user.

    QEMU would create a missing file with its own umask, readable by everyone; it sizes
    the file it finds to the guest's memory. A file left at ``path`` is replaced.
    """
    uid, gid = qemu_user()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ForkError(f"cannot create the RAM file {path}: {exc.strerror}", where=path,
                        fix=f"check that {RAM_DIR} is a directory owned by the QEMU user") from exc
    try:
        os.fchown(descriptor, uid, gid)
    finally:
        os.close(descriptor)


def _own_directory(descriptor: int, uid: int, gid: int) -> None:
    info = os.fstat(descriptor)
    if info.st_uid not in (0, uid):
        raise ForkError(
            f"{RAM_DIR} belongs to uid {info.st_uid}, neither root nor the QEMU user "
            f"(uid {uid})",
            where=RAM_DIR, fix=f"check who created it, then remove {RAM_DIR}",
        )
    if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, 0o700):
        return
    try:
        os.fchown(descriptor, uid, gid)
        os.fchmod(descriptor, 0o700)
    except OSError as exc:
        raise ForkError(
            f"cannot give {RAM_DIR} to the QEMU user (uid {uid}, gid {gid}): {exc.strerror}",
            where=RAM_DIR, fix="run labctl as root",
        ) from exc


def qemu_user(conf_path: str = QEMU_CONF) -> tuple[int, int]:
    """Return the uid and gid that libvirt's system daemon runs QEMU under.

    The ``user`` and ``group`` settings of qemu.conf count when set. Otherwise this
    returns the default of Debian's packages (libvirt-qemu), then Fedora's (qemu), then
    root, whichever user exists first.
    """
    try:
        with open(conf_path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        text = ""
    user = _conf_value(text, "user")
    if user is None:
        user = next((name for name in ("libvirt-qemu", "qemu") if _user_exists(name)), "+0")
    uid, primary_gid, user_name = _resolve_user(user)
    group = _conf_value(text, "group")
    if group is not None:
        return uid, _resolve_group(group)
    with contextlib.suppress(KeyError):
        return uid, grp.getgrnam(user_name).gr_gid
    return uid, primary_gid


def _conf_value(text: str, key: str) -> str | None:
    """Return the value of ``key = "value"`` in a libvirt configuration file, or None."""
    match = re.search(rf'^[ \t]*{key}[ \t]*=[ \t]*"([^"]*)"', text, re.MULTILINE)
    return match.group(1) if match else None


def _user_exists(name: str) -> bool:
    return _lookup(pwd.getpwnam, pwd.getpwuid, name) is not None


def _resolve_user(value: str) -> tuple[int, int, str]:
    """Return uid, primary gid and name of a qemu.conf user: a name, "+UID" or "UID"."""
    entry = _lookup(pwd.getpwnam, pwd.getpwuid, value)
    if entry is not None:
        return entry.pw_uid, entry.pw_gid, entry.pw_name
    if value.lstrip("+").isdigit():
        # A uid without a passwd entry has no primary group. Group 0 gives no access,
        # because RAM_DIR has mode 0700.
        return int(value.lstrip("+")), 0, ""
    raise ForkError(f"the QEMU user {value!r} of {QEMU_CONF} does not exist",
                    where=QEMU_CONF, fix="set user in qemu.conf to an existing user")


def _resolve_group(value: str) -> int:
    """Return the gid of a qemu.conf group: a name, "+GID" or "GID"."""
    entry = _lookup(grp.getgrnam, grp.getgrgid, value)
    if entry is not None:
        return entry.gr_gid
    if value.lstrip("+").isdigit():
        return int(value.lstrip("+"))
    raise ForkError(f"the QEMU group {value!r} of {QEMU_CONF} does not exist",
                    where=QEMU_CONF, fix="set group in qemu.conf to an existing group")


def _lookup(by_name: Callable[[str], Any], by_number: Callable[[int], Any], value: str) -> Any:
    """Look ``value`` up the way libvirt does: "+N" is a number, anything else a name
    first and then, if it is all digits, a number."""
    number = value.lstrip("+")
    if not value.startswith("+"):
        with contextlib.suppress(KeyError):
            return by_name(value)
    if number.isdigit():
        with contextlib.suppress(KeyError):
            return by_number(int(number))
    return None


def parent_args(ram_file: str, memory_bytes: int) -> list[str]:
    """QEMU arguments for a parent: its RAM in `ram_file`, shared (share=on).

    ``memory_bytes`` must equal the domain's <memory>: QEMU rejects a backend whose size
    differs from -m. QEMU creates ``ram_file`` when it is missing, and reuses it when not.
    """
    return _memory_args(ram_file, memory_bytes, share=True)


def child_args(ram_file: str, memory_bytes: int) -> list[str]:
    """QEMU arguments for a child: the parent's RAM file mapped private (share=off),
    plus -incoming defer.

    The child's domain must have the parent's devices and memory size, because the
    device state only fits the same machine. ``ram_file`` must exist with the size
    ``memory_bytes``, since QEMU would otherwise create a new file full of zeros and the
    child would resume on empty memory.
    """
    args = _memory_args(ram_file, memory_bytes, share=False)
    try:
        size = os.stat(ram_file).st_size
    except FileNotFoundError as exc:
        raise ForkError(
            f"the parent's RAM file {ram_file} does not exist", where=ram_file,
            fix="build the parent again: start it with parent_args and save it",
        ) from exc
    if size != memory_bytes:
        raise ForkError(
            f"the parent's RAM file {ram_file} has {size} bytes, but the child has "
            f"{memory_bytes} bytes of memory",
            where=ram_file, fix="give the child the parent's memory size",
        )
    return args + ["-incoming", "defer"]


def _memory_args(ram_file: str, memory_bytes: int, *, share: bool) -> list[str]:
    if not os.path.isabs(ram_file):
        raise ForkError(f"the RAM file path {ram_file!r} is not absolute", where=ram_file,
                        fix="pass ram_path(KEY)")
    # libvirt rounds <memory> up to whole MiB for -m on x86, and the backend must match.
    if memory_bytes <= 0 or memory_bytes % MIB:
        raise ForkError(f"invalid memory size {memory_bytes} bytes for a RAM file",
                        fix="use a positive multiple of 1 MiB")
    # The JSON form of -object needs no escaping of commas in the path.
    memory_object = {
        "qom-type": "memory-backend-file",
        "id": MEMORY_BACKEND_ID,
        "size": memory_bytes,
        "mem-path": ram_file,
        "share": share,
    }
    return ["-object", json.dumps(memory_object, separators=(",", ":")),
            "-machine", f"memory-backend={MEMORY_BACKEND_ID}"]


def save_device_state(domain: libvirt.virDomain, state_path: str, *, timeout: float) -> int:
    """Save the device state of a PAUSED parent into `state_path` with x-ignore-shared,
    and return the file's size in bytes. On failure, remove the partial file and raise
    ForkError (a LabctlError) naming the domain and what failed.

    The stream goes to ``STATE_PATH.partial`` first and is renamed when complete, so a
    file at ``state_path`` is always whole. QEMU writes into a descriptor that labctl
    opens, so the QEMU user needs no access to the directory. The parent stays paused
    in QEMU's post-migration state, with its disks flushed and released: destroy it.
    """
    name = domain.name()
    started = time.monotonic()
    what = f"saving the device state into {state_path}"
    try:
        _require_paused(domain)
        _require_memory_backend(domain, share=True)
    except ForkError as exc:
        raise _failed(what, exc, name) from exc
    partial = f"{state_path}.partial"
    try:
        _send_state(domain, partial, timeout)
        os.replace(partial, state_path)
    except (ForkError, OSError) as exc:
        _remove_quietly(partial)
        raise _failed(what, exc, name) from exc
    except BaseException:
        _remove_quietly(partial)
        raise
    size = os.path.getsize(state_path)
    log.info("saved the device state of %s into %s: %d bytes in %.2f s", name, state_path,
             size, time.monotonic() - started)
    return size


def _send_state(domain: libvirt.virDomain, partial: str, timeout: float) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    descriptor = os.open(partial, flags, 0o600)
    try:
        _set_ignore_shared(domain)
        _qmp(domain, "getfd", {"fdname": STATE_FD_NAME}, files=[descriptor])
    finally:
        os.close(descriptor)
    _qmp(domain, "migrate", {"uri": f"fd:{STATE_FD_NAME}"})
    try:
        _wait_for_migration(domain, timeout)
    except BaseException:
        with contextlib.suppress(ForkError):
            _qmp(domain, "migrate_cancel")
        raise


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def load_device_state(domain: libvirt.virDomain, state_path: str, *, timeout: float) -> None:
    """Feed `state_path` into a child started paused with child_args, and return when the
    incoming migration completed. The child is then paused, and the caller resumes it.
    On failure or timeout, raise ForkError with QEMU's error text.

    On failure the child is destroyed: a QEMU waiting for an incoming migration can do
    nothing else, and QEMU 7.2 exits by itself when the stream is bad. QEMU reads the
    stream from a regular file's descriptor as well as from a pipe (measured with QEMU
    7.2), so no thread has to copy the file into a pipe.
    """
    name = domain.name()
    started = time.monotonic()
    what = f"loading the device state from {state_path}"
    try:
        descriptor = _open_state_file(state_path)
    except ForkError as exc:
        _destroy(domain)
        raise _failed(what, exc, name) from exc
    try:
        try:
            _require_incoming(domain)
            _set_ignore_shared(domain)
            _qmp(domain, "getfd", {"fdname": STATE_FD_NAME}, files=[descriptor])
        finally:
            os.close(descriptor)
        _qmp(domain, "migrate-incoming", {"uri": f"fd:{STATE_FD_NAME}"})
        _wait_for_migration(domain, timeout)
    except ForkError as exc:
        _destroy(domain)
        raise _failed(what, exc, name, qemu_errors=_qemu_error_lines(name)) from exc
    except BaseException:
        _destroy(domain)
        raise
    log.info("loaded the device state of %s from %s in %.2f s", name, state_path,
             time.monotonic() - started)


def _open_state_file(state_path: str) -> int:
    """Return a descriptor of ``state_path`` after checking its stream header.

    O_NONBLOCK keeps a named pipe from blocking the open, and the regular-file check
    then rejects it. The header is read with pread, so the offset stays at 0 for QEMU.
    """
    try:
        descriptor = os.open(state_path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ForkError(f"cannot open it: {exc.strerror}",
                        fix="save the parent again with save_device_state") from exc
    problem = None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        problem = "it is not a regular file"
    elif os.pread(descriptor, len(STREAM_HEADER), 0) != STREAM_HEADER:
        problem = "the file is not a QEMU migration stream (no QEVM header)"
    if problem is not None:
        os.close(descriptor)
        raise ForkError(problem, fix="save the parent again with save_device_state")
    return descriptor


def _failed(what: str, exc: BaseException, name: str, *,
            qemu_errors: Sequence[str] = ()) -> ForkError:
    """Return a ForkError naming what failed on the domain ``name``, and why."""
    if isinstance(exc, ForkError):
        reason, fix = exc.message, exc.fix
    else:
        reason, fix = str(exc), "check that the state file's directory exists and is writable"
    message = f"{what} failed: {reason}"
    if qemu_errors:
        message += f" (QEMU: {'; '.join(qemu_errors)})"
    return ForkError(message, where=name, fix=fix)


def _require_paused(domain: libvirt.virDomain) -> None:
    state = _domain_state(domain)
    if state != libvirt.VIR_DOMAIN_PAUSED:
        state_name = STATE_NAMES.get(state, str(state))
        raise ForkError(f"the parent is not paused but {state_name}",
                        where=domain.name(), fix="suspend the domain before saving it")


def _require_incoming(domain: libvirt.virDomain) -> None:
    status = _qmp(domain, "query-status")
    if not isinstance(status, dict) or status.get("status") != "inmigrate":
        raise ForkError(
            f"the child does not wait for an incoming migration (QEMU status {status})",
            where=domain.name(),
            fix="start it with child_args and VIR_DOMAIN_START_PAUSED",
        )
    _require_memory_backend(domain, share=False)


def _require_memory_backend(domain: libvirt.virDomain, *, share: bool) -> None:
    """Check that the domain's RAM is the file backend with the expected share flag.

    A parent without share=on would put its whole RAM into the state file. A child with
    share=on would write into the file that every other child maps.
    """
    path = f"/objects/{MEMORY_BACKEND_ID}"
    role, args = ("parent", "parent_args") if share else ("child", "child_args")
    try:
        actual = _qmp(domain, "qom-get", {"path": path, "property": "share"})
    except ForkError as exc:
        raise ForkError(f"the {role} has no memory backend {MEMORY_BACKEND_ID}: {exc.message}",
                        where=domain.name(), fix=f"start it with {args}") from exc
    if actual is not share:
        raise ForkError(f"the {role}'s memory backend has share={actual}, expected {share}",
                        where=domain.name(), fix=f"start it with {args}")


def _set_ignore_shared(domain: libvirt.virDomain) -> None:
    _qmp(domain, "migrate-set-capabilities",
         {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


def _wait_for_migration(domain: libvirt.virDomain, timeout: float) -> None:
    """Poll query-migrate until the migration completed; raise ForkError if it did not."""
    deadline = time.monotonic() + timeout
    poll = 0.005
    while True:
        info = _qmp(domain, "query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            detail = info.get("error-desc", "no error text")  # type: ignore[union-attr]
            raise ForkError(f"the migration stream {status}: {detail}")
        if time.monotonic() >= deadline:
            raise ForkError(
                f"the migration timed out after {timeout:.0f} s (status "
                f"{status or 'not started'})",
                fix="check the host's load and free memory, then retry",
            )
        cancel.sleep(poll)
        poll = min(0.1, poll * 2)


def _qmp(domain: libvirt.virDomain, execute: str, arguments: dict | None = None, *,
         files: Sequence[int] = ()) -> object:
    """Send one QMP command through libvirt and return its ``return`` value."""
    request: dict[str, object] = {"execute": execute}
    if arguments is not None:
        request["arguments"] = arguments
    text = json.dumps(request)
    log.debug("QMP to %s: %s", domain.name(), text)
    try:
        if files:
            reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(domain, text, list(files), 0)
        else:
            reply = libvirt_qemu.qemuMonitorCommand(domain, text, 0)
    except libvirt.libvirtError as exc:
        raise ForkError(f"QMP {execute} failed: {exc.get_error_message()}",
                        where=domain.name()) from exc
    decoded = json.loads(reply)
    if "error" in decoded:
        raise ForkError(f"QMP {execute} failed: {decoded['error'].get('desc')}",
                        where=domain.name())
    return decoded.get("return")


def _domain_state(domain: libvirt.virDomain) -> int:
    try:
        return domain.state()[0]
    except libvirt.libvirtError as exc:
        raise ForkError(f"cannot read the domain state: {exc.get_error_message()}",
                        where=domain.name()) from exc


def _destroy(domain: libvirt.virDomain) -> None:
    try:
        domain.destroy()
        log.info("destroyed child %s after its device state failed to load", domain.name())
    except libvirt.libvirtError as exc:
        log.debug("child %s already stopped: %s", domain.name(), exc.get_error_message())


def _qemu_error_lines(name: str, *, wait: float = 2.0) -> list[str]:
    """Return the error lines QEMU printed since the domain's last start.

    They are in the domain's log of the local system daemon, where virtlogd writes
    QEMU's stderr a moment after QEMU exits, so this waits up to ``wait`` seconds for
    them. libvirt's own lines have a space after the date, QEMU's a "T".
    """
    path = os.path.join(QEMU_LOG_DIR, f"{name}.log")
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            return []
        last_start = text.rfind("starting up libvirt version")
        found = QEMU_LOG_LINE.findall(text[max(last_start, 0):])
        lines = [line for line in found if not line.startswith("terminating on signal")]
        if lines or time.monotonic() >= deadline:
            return lines
        time.sleep(0.1)


def unavailable_reason(conn: libvirt.virConnect) -> str | None:
    """Why fork cannot run on this connection (e.g. a remote URI: the RAM file must be on
    the libvirt host; libvirt-python without qemuMonitorCommandWithFiles; the QEMU binary
    lacks x-ignore-shared), or None when it can. Cheap: no domain is started.

    The QEMU check runs the emulator once with -machine none and caches the result.
    """
    uri = conn.getURI()
    if conn.getType() != "QEMU":
        return f"{uri} is not a QEMU connection (driver {conn.getType()})"
    if not is_local(uri):
        return (f"{uri} is remote, but the parent's RAM file must be on the host that runs "
                "labctl, and descriptors pass only over a local socket")
    if not uri.partition("?")[0].endswith("/system"):
        return (f"{uri} is not the system daemon, whose QEMU user owns {RAM_DIR}; "
                "use qemu:///system")
    if not hasattr(libvirt_qemu, "qemuMonitorCommandWithFiles"):
        return "libvirt-python lacks qemuMonitorCommandWithFiles; install libvirt-python >= 8.2"
    if conn.getLibVersion() < MIN_LIBVIRT_VERSION:
        return (f"libvirt {_version_text(conn.getLibVersion())} lacks "
                "virDomainQemuMonitorCommandWithFiles (libvirt >= 8.2.0 has it)")
    if not os.path.isdir(os.path.dirname(RAM_DIR)):
        return f"{os.path.dirname(RAM_DIR)} does not exist, so there is no tmpfs for RAM files"
    emulator = _emulator_path(conn)
    try:
        capabilities = _migration_capabilities(emulator)
    except ForkError as exc:
        return exc.message
    if "x-ignore-shared" not in capabilities:
        return f"{emulator} lacks the migration capability x-ignore-shared (QEMU >= 4.0 has it)"
    return None


def _version_text(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _emulator_path(conn: libvirt.virConnect) -> str:
    """Return the QEMU binary libvirt uses for x86_64 "pc" guests."""
    try:
        caps = conn.getDomainCapabilities(None, "x86_64", "pc", "qemu", 0)
    except libvirt.libvirtError:
        return "/usr/bin/qemu-system-x86_64"
    return ET.fromstring(caps).findtext("path") or "/usr/bin/qemu-system-x86_64"


@functools.lru_cache(maxsize=8)
def _migration_capabilities(emulator: str) -> frozenset[str]:
    """Return the migration capabilities ``emulator`` reports over QMP (no guest runs)."""
    commands = [{"execute": "qmp_capabilities"}, {"execute": "query-migrate-capabilities"},
                {"execute": "quit"}]
    argv = [emulator, "-machine", "none", "-nodefaults", "-no-user-config", "-display",
            "none", "-qmp", "stdio"]
    try:
        result = subprocess.run(argv, input="".join(json.dumps(c) + "\n" for c in commands),
                                capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ForkError(f"cannot run {emulator} to read its migration capabilities: {exc}",
                        where=emulator) from exc
    for line in result.stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            reply = json.loads(line).get("return")
            if isinstance(reply, list):
                return frozenset(entry.get("capability") for entry in reply)
    raise ForkError(f"{emulator} returned no migration capabilities: "
                    f"{result.stderr.strip() or 'no error text'}", where=emulator)
