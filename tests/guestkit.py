"""Test helpers for booting an image directly with QEMU and talking to the guest.

Covers: SSH key pairs, a NoCloud seed ISO with labctl's extra files, a QEMU process
with a serial log, a QMP socket and a guest agent socket, and minimal QMP and guest
agent clients. Networking is QEMU user networking restricted to a 127.0.0.1 forward.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pycdlib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 key pair: OpenSSH private key text and the public authorized_keys line."""

    private: str
    public: str

    def paramiko_key(self) -> paramiko.Ed25519Key:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.private))


def make_key_pair(comment: str = "labctl-test") -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return KeyPair(private=private, public=f"{public} {comment}")


@dataclass
class Seed:
    """The identity a test puts in a seed ISO (labctl's seed contract)."""

    hostname: str
    machine_id: str
    instance_id: str
    host_key: KeyPair
    client_key: KeyPair
    fqdn: str = ""
    extra_files: dict[str, bytes] = field(default_factory=dict)

    def files(self) -> dict[str, tuple[bytes, int]]:
        """Return seed path -> (content, Rock Ridge mode)."""
        meta = f"instance-id: {self.instance_id}\nlocal-hostname: {self.hostname}\n"
        env = (
            f"LABCTL_HOSTNAME={self.hostname}\nLABCTL_MACHINE_ID={self.machine_id}\n"
            f"LABCTL_INSTANCE_ID={self.instance_id}\n"
            f"LABCTL_FQDN={self.fqdn or self.hostname + '.lab.test'}\n"
        )
        files = {
            "meta-data": (meta.encode(), 0o644),
            "user-data": (b"#cloud-config\n{}\n", 0o644),
            "labctl/identity.env": (env.encode(), 0o644),
            "labctl/ssh_host_ed25519_key": (self.host_key.private.encode(), 0o600),
            "labctl/authorized_keys": ((self.client_key.public + "\n").encode(), 0o644),
        }
        files.update({name: (data, 0o644) for name, data in self.extra_files.items()})
        return files


def _iso_name(name: str, used_names: set[str]) -> str:
    """Return a unique ISO 9660 level 1 name (8.3, upper case) for ``name``."""
    stem = re.sub(r"[^A-Z0-9_]", "", name.upper().replace("-", "_"))[:8] or "FILE"
    candidate, number = stem, 0
    while candidate in used_names:
        number += 1
        candidate = f"{stem[:6]}{number:02d}"
    used_names.add(candidate)
    return candidate


def write_seed_iso(path: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    """Write a NoCloud seed ISO (volume id CIDATA, Joliet and Rock Ridge) holding ``files``.

    Paths may have one directory level ("labctl/identity.env"). Rock Ridge and Joliet
    keep the real names, and the ISO 9660 names are only a fallback.
    """
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident="CIDATA", joliet=3, rock_ridge="1.09")
    directories: dict[str, str] = {"": ""}
    used_names: dict[str, set[str]] = {"": set()}
    try:
        for name, (data, mode) in sorted(files.items()):
            parent, _, leaf = name.rpartition("/")
            if parent not in directories:
                iso_dir = "/" + _iso_name(parent, used_names[""])
                iso.add_directory(iso_dir, rr_name=parent, joliet_path="/" + parent)
                directories[parent] = iso_dir
                used_names[parent] = set()
            iso_path = f"{directories[parent]}/{_iso_name(leaf, used_names[parent])}.;1"
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path,
                rr_name=leaf,
                joliet_path="/" + name,
                file_mode=0o100000 | mode,
            )
        iso.write(str(path))
    finally:
        iso.close()
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_ssh_banner(port: int, timeout: float) -> float:
    """Wait until 127.0.0.1:``port`` sends an SSH banner and return the seconds waited.

    QEMU's user networking accepts a forwarded connection before the guest listens, so
    only the banner shows that the SSH server runs.
    """
    started = time.monotonic()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                if sock.recv(4) == b"SSH-":
                    return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no SSH banner on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.2)


def _read_json(sock: socket.socket, buffer: bytearray, deadline: float) -> dict:
    while True:
        line_end = buffer.find(b"\n")
        if line_end >= 0:
            line = bytes(buffer[:line_end]).strip()
            del buffer[: line_end + 1]
            if line:
                return json.loads(line)
            continue
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("socket closed")
        buffer.extend(chunk)


class Qmp:
    """A QMP client on QEMU's monitor socket."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buffer = bytearray()
        self.timeout = timeout
        _read_json(self.sock, self.buffer, time.monotonic() + timeout)
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = _read_json(self.sock, self.buffer, deadline)
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.sock.close()


class Agent:
    """A qemu-ga client on the host side of the virtio-serial port."""

    def __init__(self, path: Path):
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.sync_id = int(time.time()) % 1000000

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(self.path))
            self.buffer = bytearray()
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def sync(self, timeout: float) -> None:
        """Flush stale replies (guest-sync-delimited). Raises TimeoutError if no agent replies."""
        sock = self._connect()
        self.sync_id += 1
        request = {"execute": "guest-sync-delimited", "arguments": {"id": self.sync_id}}
        sock.sendall(b"\xff" + json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            try:
                start = self.buffer.find(b"\xff")
                if start >= 0:
                    del self.buffer[: start + 1]
                    reply = _read_json(sock, self.buffer, deadline)
                    if reply.get("return") == self.sync_id:
                        return
                    continue
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("agent socket closed")
                self.buffer.extend(chunk)
            except TimeoutError as exc:
                raise TimeoutError("guest agent did not reply to guest-sync-delimited") from exc

    def execute(self, command: str, timeout: float = 10.0, **arguments: object) -> object:
        self.sync(timeout)
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        sock = self._connect()
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = _read_json(sock, self.buffer, time.monotonic() + timeout)
        if "error" in reply:
            raise RuntimeError(f"guest agent {command}: {reply['error']}")
        return reply.get("return")

    def send_only(self, command: str, **arguments: object) -> None:
        """Send a command that has no reply (guest-shutdown)."""
        self.sync(10.0)
        message = {"execute": command, "arguments": arguments}
        self._connect().sendall(json.dumps(message).encode() + b"\n")

    def run(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        """Run ``argv`` in the guest with guest-exec and return (exit code, stdout)."""
        started = self.execute("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.execute("guest-exec-status", pid=started["pid"])
            if status["exited"]:
                output = base64.b64decode(status.get("out-data", "")).decode()
                return status.get("exitcode", -1), output
            time.sleep(0.1)
        raise TimeoutError(f"guest-exec {argv} did not finish in {timeout} s")

    def wait(self, timeout: float) -> float:
        """Wait until guest-ping succeeds and return the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:
                self.execute("guest-ping", timeout=1.0)
                return time.monotonic() - started
            except (TimeoutError, ConnectionError, OSError):
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@dataclass
class Nic:
    """A user-networking NIC with a 127.0.0.1 forward to the guest's port 22."""

    id: str
    mac: str
    ssh_port: int
    # Each NIC needs its own subnet: with two NICs in 10.0.2.0/24 the guest would send
    # every reply out of the first one.
    subnet: str = "10.0.2.0/24"

    def netdev(self) -> str:
        return (
            f"user,id={self.id},net={self.subnet},restrict=on,ipv6=off,"
            f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
        )


class Guest:
    """A QEMU process booting a kernel and initramfs directly, with its sockets in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        kernel: Path,
        initrd: Path,
        cmdline: str,
        disk: Path | None = None,
        seed: Path | None = None,
        seed_bus: str = "virtio",
        memory_mib: int = 128,
    ):
        self.workdir = workdir
        self.disk = disk
        self.console = workdir / "console.log"
        self.agent_socket = workdir / "agent.sock"
        self.qmp_socket = workdir / "qmp.sock"
        self.nic = Nic("n0", "52:54:00:7e:00:01", free_port())
        argv = [
            QEMU,
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-m",
            str(memory_mib),
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{self.console}",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
            "-chardev",
            f"socket,id=ga,path={self.agent_socket},server=on,wait=off",
            "-device",
            "virtio-serial",
            "-device",
            "virtserialport,chardev=ga,name=org.qemu.guest_agent.0",
            "-netdev",
            self.nic.netdev(),
            "-device",
            f"virtio-net-pci,netdev={self.nic.id},mac={self.nic.mac}",
        ]
        if disk is not None:
            argv += ["-drive", f"file={disk},if=virtio,format=qcow2"]
        if seed is not None and seed_bus == "ide":
            argv += ["-drive", f"file={seed},if=ide,media=cdrom,format=raw,readonly=on"]
        elif seed is not None:
            argv += ["-drive", f"file={seed},if=virtio,format=raw,readonly=on"]
        self.argv = argv
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.agent = Agent(self.agent_socket)
        try:
            self.qmp = self._connect_qmp()
        except BaseException:
            self.process.kill()
            self.process.wait(10)
            raise

    def _connect_qmp(self, timeout: float = 10.0) -> Qmp:
        """Connect to QMP, retrying while QEMU has not bound or not yet listens on the socket."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Qmp(self.qmp_socket)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if self.process.poll() is not None:
                    stderr = self.process.stderr.read().decode()
                    raise RuntimeError(f"QEMU exited: {stderr}") from exc
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the serial console log matches ``pattern`` and return the match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.console_text())
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"console never matched {pattern!r}:\n{self.console_text()}")
            time.sleep(0.1)

    def ssh(
        self, key: KeyPair, port: int | None = None, timeout: float = 30.0
    ) -> paramiko.SSHClient:
        """Connect as root with ``key``, retrying until the deadline.

        Any host key is accepted, so the caller checks it through
        ``get_transport().get_remote_server_key()``.
        """
        deadline = time.monotonic() + timeout
        port = port or self.nic.ssh_port
        wait_for_ssh_banner(port, timeout)
        while True:
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect(
                    "127.0.0.1",
                    port=port,
                    username="root",
                    pkey=key.paramiko_key(),
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=3,
                    banner_timeout=3,
                    auth_timeout=3,
                )
                return client
            except (paramiko.SSHException, OSError, EOFError):
                client.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def hotplug_nic(self, nic: Nic) -> None:
        """Add ``nic`` at run time through QMP (netdev_add, then device_add)."""
        self.qmp.execute(
            "netdev_add",
            type="user",
            id=nic.id,
            net=nic.subnet,
            restrict=True,
            ipv6=False,
            hostfwd=[{"str": f"tcp:127.0.0.1:{nic.ssh_port}-:22"}],
        )
        self.qmp.execute(
            "device_add", driver="virtio-net-pci", netdev=nic.id, mac=nic.mac, id=f"dev-{nic.id}"
        )

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Close the clients and end the QEMU process (by its pid)."""
        self.agent.close()
        self.qmp.close()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.process.stderr is not None:
            self.process.stderr.close()
