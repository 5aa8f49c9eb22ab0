"""Secrets and trust: no shell strings, no leaked secrets, private files, verified host keys.

The static checks read labctl's source with Python's ``ast`` module. The apply checks
run one inventory of the tiny image with DEBUG logging and a state directory of its own
(LABCTL_STATE_DIR). Its linked desktop and its instant clone both get a user with a
password hash. The checks then look for the secrets in everything labctl printed, in
libvirt's domain XML and in the console logs. The SSH checks run against a paramiko
server on 127.0.0.1 that the test starts, and against the running desktops.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import os
import secrets
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import paramiko
import pycdlib
import pytest
import yaml
from conftest import (
    REPO, TEST_POOL, TEST_POOL_PATH, URI, destroy_inventory, run_labctl, unique_name,
)
from test_apply_tiny import describe_run

from orchestrator.errors import GuestError, HostError, InventoryError
from orchestrator.guest import ssh
from orchestrator.hosts.connection import open_connection
from orchestrator.identity import keys
from orchestrator.instant.parent import PREFIX, ParentRecord
from orchestrator.inventory import load_inventory
from orchestrator.provision import readiness
from orchestrator.provision.desktop import console_log_path
from orchestrator.state import metadata
from orchestrator.state.metadata import PARENT_NAMESPACE

# Seconds one apply of two tiny guests may take on a loaded 2-core host under TCG.
APPLY_TIMEOUT = 900
SOURCE_DIRS = ("orchestrator", "scripts")
SUBPROCESS_FUNCTIONS = {"run", "call", "check_call", "check_output", "Popen"}
# Functions that always hand their command to /bin/sh.
SHELL_FUNCTIONS = {
    "os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
}
# paramiko policies that accept an unknown host key.
ACCEPTING_POLICIES = {"AutoAddPolicy", "WarningPolicy"}
# OpenSSH options that accept unknown or changed host keys.
WEAK_SSH_OPTIONS = ("StrictHostKeyChecking=no", "StrictHostKeyChecking=accept-new",
                    "UserKnownHostsFile=/dev/null")


# -- static checks of the source ------------------------------------------------------


def _imported_names(tree: ast.Module) -> dict[str, str]:
    """Return local name -> dotted origin for the module's imports (``sp`` -> ``subprocess``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, imports: dict[str, str]) -> str:
    """Return the dotted name a call target resolves to through imports, or ''."""
    if isinstance(node, ast.Name):
        return imports.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, imports)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_string_command(node: ast.expr) -> bool:
    """Return whether ``node`` builds a str (literal, f-string, concatenation, % or .format)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _is_string_command(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("format", "join") and _is_string_command(node.func.value)
    return False


def _call_findings(call: ast.Call, imports: dict[str, str]) -> list[str]:
    target = _dotted(call.func, imports)
    findings = []
    if target in SHELL_FUNCTIONS:
        findings.append(f"{target}() runs its command through /bin/sh")
    module, _, function = target.rpartition(".")
    runs_process = module == "subprocess" and function in SUBPROCESS_FUNCTIONS
    for keyword in call.keywords:
        if keyword.arg != "shell":
            continue
        value = keyword.value
        off = isinstance(value, ast.Constant) and value.value in (False, None)
        # shell=True anywhere; any other value only where it reaches subprocess.
        if (isinstance(value, ast.Constant) and value.value is True) or (
                runs_process and not off):
            findings.append(f"{target or 'a call'} with shell={ast.unparse(value)}")
    if runs_process:
        argv = call.args[0] if call.args else next(
            (keyword.value for keyword in call.keywords if keyword.arg == "args"), None)
        if argv is not None and _is_string_command(argv):
            findings.append(f"{target}() with a string command, not an argv list")
    return findings


def _policy_findings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Attribute) and node.attr in ACCEPTING_POLICIES:
        return [f"paramiko {node.attr} accepts unknown host keys"]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [f"the SSH option {option} accepts unknown host keys"
                for option in WEAK_SSH_OPTIONS if option in node.value]
    return []


def scan_source(text: str, filename: str) -> list[str]:
    """Return 'FILE:LINE: finding' for each shell command or host key bypass in ``text``."""
    tree = ast.parse(text, filename=filename)
    imports = _imported_names(tree)
    # Docstrings may name the options they warn about.
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    findings = []
    for node in ast.walk(tree):
        found = _call_findings(node, imports) if isinstance(node, ast.Call) else []
        if id(node) not in docstrings:
            found += _policy_findings(node)
        findings += [f"{filename}:{node.lineno}: {finding}" for finding in found]
    return findings


def python_sources() -> list[Path]:
    """Return the Python files under orchestrator/ and scripts/ (by suffix or shebang)."""
    files = []
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*")):
            if not path.is_file():
                continue
            if path.suffix == ".py" or path.read_bytes()[:64].startswith(b"#!/usr/bin/env python"):
                files.append(path)
    return files


def test_scanner_finds_each_pattern():
    """The scanner itself: each forbidden form in a sample is reported at its line."""
    sample = "\n".join([
        "import os, subprocess as sp",
        "from subprocess import run",
        "import paramiko",
        "sp.run(['ls'], shell=True)",
        "os.system('ls')",
        "os.popen('ls')",
        "run('ls -l')",
        "sp.check_output(f'ls {name}')",
        "sp.Popen(args='ls ' + name)",
        "client.set_missing_host_key_policy(paramiko.AutoAddPolicy())",
        "argv = ['ssh', '-o', 'StrictHostKeyChecking=no']",
        "sp.run(['ls', name], check=True)",
        "sp.run(argv, shell=False)",
        "UserAccount(name, shell=user.shell)",
        "def f():\n    'Never pass StrictHostKeyChecking=no.'",
    ])
    findings = scan_source(sample, "sample.py")
    lines = sorted(int(finding.split(":")[1]) for finding in findings)
    assert lines == [4, 5, 6, 7, 8, 9, 10, 11], "\n".join(findings)


def test_no_shell_strings_in_source():
    sources = python_sources()
    assert len(sources) > 50, f"found only {len(sources)} Python files under {SOURCE_DIRS}"
    findings = []
    for path in sources:
        findings += scan_source(path.read_text(), str(path.relative_to(REPO)))
    assert not findings, "shell strings or host key bypasses in labctl:\n" + "\n".join(findings)


def test_shell_scripts_keep_host_key_checks():
    """The shell scripts labctl ships and runs pass no option that skips host key checks."""
    scripts = [path for directory in SOURCE_DIRS for path in (REPO / directory).rglob("*")
               if path.is_file() and path.suffix != ".py"
               and path.read_bytes()[:32].startswith((b"#!/bin/sh", b"#!/usr/bin/env bash"))]
    assert scripts, "no shell scripts found; the check would pass vacuously"
    findings = [f"{path.relative_to(REPO)}:{number}: {option}"
                for path in scripts
                for number, line in enumerate(path.read_text().splitlines(), 1)
                for option in WEAK_SSH_OPTIONS if option in line]
    assert not findings, "host key checks turned off:\n" + "\n".join(findings)


# -- libvirt URIs that would skip the remote host's key check -----------------------------


WEAK_URIS = [
    "qemu+ssh://admin@host.example/system?no_verify=1",
    "qemu+ssh://admin@host.example/system?keyfile=/k&no_verify=yes",
    "qemu+libssh://admin@host.example/system?known_hosts_verify=ignore",
    "qemu+libssh2://admin@host.example/system?known_hosts_verify=AUTO",
    "qemu+libssh2://admin@host.example/system?keyfile=/k;known_hosts_verify=auto",
]


@pytest.mark.parametrize("uri", WEAK_URIS)
def test_connection_rejects_unchecked_host_key(uri):
    with pytest.raises(HostError) as caught:
        open_connection(uri)
    assert "host key checking" in str(caught.value), str(caught.value)
    assert caught.value.where == uri


def remote_inventory(path: Path, uri: str) -> Path:
    """Write an inventory whose one pool runs on the host at ``uri``, and return its path."""
    path.write_text(yaml.safe_dump({
        "name": "remote", "hosts": {"remote": {"uri": uri}},
        "images": {"tiny": {"build": "tiny"}},
        "pools": {"p": {"image": "tiny", "clone": "linked", "host": "remote", "size": 1,
                        "naming": "p{n}"}},
    }))
    return path


@pytest.mark.parametrize("uri", WEAK_URIS)
def test_inventory_rejects_unchecked_host_key(tmp_path, uri):
    path = remote_inventory(tmp_path / "weak.yaml", uri)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    message = str(caught.value)
    assert "turns off SSH host key checking" in message, message
    assert f"{path}:" in message, f"the error does not name FILE:LINE: {message}"


@pytest.mark.parametrize("uri", [
    "qemu+ssh://admin@host.example/system",
    "qemu+ssh://admin@host.example/system?no_verify=0&keyfile=/root/.ssh/lab",
    "qemu+libssh2://admin@host.example/system?known_hosts_verify=normal",
])
def test_inventory_accepts_checked_uri(tmp_path, uri):
    path = remote_inventory(tmp_path / "checked.yaml", uri)
    assert load_inventory(path).hosts["remote"].uri == uri


# -- invalid password hashes are not echoed ----------------------------------------------


@pytest.mark.parametrize("user", [
    {"password": "$6$saltsalt$SECRETVALUEabc"},
    {"password_hash": ["$6$saltsalt$SECRETVALUEabc"]},
    {"password_hash": "$1$saltsalt$SECRETVALUEabc"},
    {"password_hash": "hunter2SECRETVALUE"},
], ids=["misspelled-key", "wrong-type", "weak-method", "plain-password"])
def test_validate_hides_bad_password(tmp_path, user):
    path = tmp_path / "bad-user.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad-user", "images": {"tiny": {"build": "tiny"}},
        "pools": {"p": {"image": "tiny", "clone": "linked", "size": 1, "naming": "p{n}",
                        "identity": {"users": [{"name": "student", **user}]}}},
    }))
    result = run_labctl("-vv", "validate", str(path), timeout=60,
                        env={**os.environ, "LABCTL_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 2, describe_run(result)
    assert "SECRETVALUE" not in result.stdout + result.stderr, describe_run(result)


# -- guest SSH against a paramiko server on 127.0.0.1 -------------------------------------


class _GuestStandIn(paramiko.ServerInterface):
    """An SSH server interface that accepts one client key and prints ``root`` for ``id -un``."""

    def __init__(self, client_key: paramiko.PKey):
        self.client_key = client_key

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key == self.client_key:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        # The reply goes out after paramiko has acknowledged the request.
        threading.Thread(target=self._answer, args=(channel, command), daemon=True).start()
        return True

    @staticmethod
    def _answer(channel: paramiko.Channel, command: bytes) -> None:
        # EOF, not close: a close that overtakes the request's reply fails exec_command.
        channel.sendall(b"root\n" if command == b"id -un" else b"")
        channel.send_exit_status(0)
        channel.shutdown_write()


@dataclass
class LocalSshServer:
    """A paramiko SSH server on 127.0.0.1 presenting ``host_key``, run in threads."""

    host_key: keys.KeyPair
    client_key: keys.KeyPair
    listener: socket.socket = field(init=False)
    transports: list[paramiko.Transport] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def _serve(self) -> None:
        host = paramiko.Ed25519Key.from_private_key(io.StringIO(self.host_key.private))
        client = paramiko.Ed25519Key.from_private_key(io.StringIO(self.client_key.private))
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed by stop()
            transport = paramiko.Transport(connection)
            transport.add_server_key(host)
            self.transports.append(transport)
            try:
                transport.start_server(server=_GuestStandIn(client))
            except (paramiko.SSHException, EOFError, OSError):
                continue  # the client dropped the connection, e.g. at a host key mismatch

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in _serve
        self.listener.close()
        for transport in self.transports:
            transport.close()
        self.thread.join(5)


@pytest.fixture
def ssh_server() -> Iterator[LocalSshServer]:
    server = LocalSshServer(keys.generate_ed25519("root@stand-in"),
                            keys.generate_ed25519("labctl-test"))
    yield server
    server.stop()


def test_login_with_recorded_key_works(ssh_server):
    """The positive control: the server's own key is accepted and ``id -un`` is read."""
    waited = ssh.wait_for_login("127.0.0.1", ssh_server.port, "root",
                                ssh_server.client_key.private, ssh_server.host_key.public,
                                timeout=30, name="stand-in")
    assert waited < 30


def test_login_rejects_other_host_key(ssh_server):
    recorded = keys.generate_ed25519("root@recorded").public
    with pytest.raises(GuestError) as caught:
        ssh.wait_for_login("127.0.0.1", ssh_server.port, "root", ssh_server.client_key.private,
                           recorded, timeout=30, name="stand-in")
    message = str(caught.value)
    assert "SSH host key mismatch" in message, message
    assert message.startswith("stand-in: "), f"the error does not name the desktop: {message}"


def test_connect_never_adds_unknown_key(ssh_server):
    """paramiko's client keeps only the recorded key: the server's is not added on connect."""
    recorded = keys.generate_ed25519("root@recorded").public
    with pytest.raises(paramiko.BadHostKeyException):
        ssh.connect("127.0.0.1", ssh_server.port, "root", ssh_server.client_key.private,
                    recorded)


# -- one apply with secrets, read back from every place they must not reach ---------------


def _random_password_hash() -> str:
    alphabet = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    salt = "".join(secrets.choice(alphabet) for _ in range(16))
    digest = "".join(secrets.choice(alphabet) for _ in range(86))
    return f"$6${salt}${digest}"


@dataclass
class SecretLab:
    """An applied inventory whose users carry ``password_hash``, and labctl's runs on it."""

    name: str
    path: Path
    state_dir: Path
    env: dict[str, str]
    password_hash: str
    linked: str
    child: str
    runs: dict[str, object] = field(default_factory=dict)

    def labctl(self, *args: str, timeout: float = APPLY_TIMEOUT):
        return run_labctl(*args, timeout=timeout, env=self.env)

    @property
    def access_key(self) -> str:
        return (self.state_dir / "keys" / self.name / "id_ed25519").read_text()


def _write_inventory(lab: SecretLab) -> None:
    """Write the lab's inventory: one linked desktop and one instant clone of the tiny image."""
    user = {"name": "student", "password_hash": lab.password_hash,
            "ssh_authorized_keys": [keys.generate_ed25519("student@lab").public]}
    pool = {"image": "tiny", "size": 1, "network": "lab",
            "hardware": {"memory": "128MiB"}, "identity": {"users": [user]}}
    linked_prefix, child_prefix = lab.linked[:-1], lab.child[:-1]
    document = {
        "name": lab.name,
        "hosts": {"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH}}},
        "images": {"tiny": {"build": "tiny"}},
        "networks": {"lab": {"mode": "user"}},
        "pools": {"linked": {**pool, "clone": "linked", "naming": f"{linked_prefix}{{n}}"},
                  "kids": {**pool, "clone": "instant", "naming": f"{child_prefix}{{n}}"}},
    }
    lab.path.write_text(yaml.safe_dump(document, sort_keys=False))


@pytest.fixture(scope="module")
def secret_lab(tmp_path_factory, tiny_image) -> Iterator[SecretLab]:
    """Apply the lab with DEBUG logging, run the read-only commands, and destroy it last."""
    directory = tmp_path_factory.mktemp("secret-lab")
    state = directory / "state"
    name = unique_name("s")
    lab = SecretLab(name, directory / f"{name}.yaml", state,
                    {**os.environ, "LABCTL_STATE_DIR": str(state)}, _random_password_hash(),
                    linked=f"{unique_name('sl')}1", child=f"{unique_name('si')}1")
    _write_inventory(lab)
    inventory = str(lab.path)
    try:
        lab.runs["apply"] = lab.labctl("-vv", "apply", "-o", "json", inventory)
        lab.runs["apply-again"] = lab.labctl("-vv", "apply", inventory)
        lab.runs["plan"] = lab.labctl("-vv", "plan", "-o", "json", inventory)
        lab.runs["status"] = lab.labctl("-vv", "status", "-o", "json", inventory)
        lab.runs["ssh"] = lab.labctl("-vv", "ssh", lab.linked, "-i", inventory, "--", "true",
                                     timeout=60)
        yield lab
    finally:
        destroy_inventory(lab.path, env=lab.env)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def applied_secrets(secret_lab) -> SecretLab:
    apply = secret_lab.runs["apply"]
    assert apply.returncode == 0, f"apply failed: {describe_run(apply)}"
    return secret_lab


def _inventory_domains(conn: libvirt.virConnect, lab: SecretLab) -> list[libvirt.virDomain]:
    """Return the lab's desktops and its instant pool's parent VM."""
    found = [conn.lookupByName(lab.linked), conn.lookupByName(lab.child)]
    for domain in conn.listAllDomains(0):
        if not domain.name().startswith(PREFIX):
            continue
        parent = metadata.read(domain, ParentRecord, PARENT_NAMESPACE)
        if parent is not None and parent.inventory == lab.name:
            found.append(domain)
    return found


def _seed_files(seed_path: str) -> dict[str, bytes]:
    """Return the files of a NoCloud seed ISO by their Rock Ridge paths."""
    iso = pycdlib.PyCdlib()
    iso.open(seed_path)
    try:
        files = {}
        for root, _dirs, names in iso.walk(rr_path="/"):
            for leaf in names:
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, rr_path=f"{root.rstrip('/')}/{leaf}")
                files[f"{root.strip('/')}/{leaf}".lstrip("/")] = out.getvalue()
        return files
    finally:
        iso.close()


def _pem_markers(private_key: str) -> list[str]:
    """Return the strings that show a private key: its PEM body lines and a base64 slice."""
    body = [line for line in private_key.splitlines() if line and not line.startswith("-----")]
    encoded = base64.b64encode(private_key.encode()).decode()
    # The first body line is the same in every unencrypted ed25519 key (format header).
    return body[1:] + [encoded[len(encoded) // 2 // 4 * 4:][:48]]


def _secret_markers(lab: SecretLab, seeds: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """Return marker -> what it is, for every secret of the lab."""
    markers = {lab.password_hash: "the password hash",
               "PRIVATE KEY-----": "a PEM header"}
    for marker in _pem_markers(lab.access_key):
        markers[marker] = "the access key"
    for domain, files in seeds.items():
        host_key = files["labctl/ssh_host_ed25519_key"].decode()
        for marker in _pem_markers(host_key):
            markers[marker] = f"{domain}'s SSH host key"
    return markers


def _seeds(conn: libvirt.virConnect, lab: SecretLab) -> dict[str, dict[str, bytes]]:
    seeds = {}
    for domain in _inventory_domains(conn, lab):
        record = metadata.read(domain) or metadata.read(domain, ParentRecord, PARENT_NAMESPACE)
        assert record is not None, f"{domain.name()} has no labctl metadata"
        assert record.seed, f"{domain.name()} records no seed"
        seeds[domain.name()] = _seed_files(record.seed)
    return seeds


def _leaks(text: str, markers: dict[str, str]) -> list[str]:
    return sorted({what for marker, what in markers.items() if marker in text})


def test_seeds_hold_the_secrets(applied_secrets, conn):
    """The markers are real: each seed contains the password hash and a PEM host key."""
    seeds = _seeds(conn, applied_secrets)
    assert len(seeds) == 3, f"expected the linked desktop, the child and the parent: {seeds}"
    for domain, files in seeds.items():
        user_data = files["user-data"].decode()
        assert applied_secrets.password_hash in user_data, f"{domain}: no hash in user-data"
        assert "PRIVATE KEY" in files["labctl/ssh_host_ed25519_key"].decode(), domain


def test_output_keeps_secrets(applied_secrets, conn):
    markers = _secret_markers(applied_secrets, _seeds(conn, applied_secrets))
    for run, result in applied_secrets.runs.items():
        assert result.returncode == 0, f"labctl {run}: {describe_run(result)}"
        assert "DEBUG" in result.stderr or run == "ssh", f"labctl {run} logged no DEBUG lines"
        for stream in ("stdout", "stderr"):
            leaks = _leaks(getattr(result, stream), markers)
            assert not leaks, f"labctl {run} printed {', '.join(leaks)} on {stream}"


def test_libvirt_keeps_secrets(applied_secrets, conn):
    markers = _secret_markers(applied_secrets, _seeds(conn, applied_secrets))
    for domain in _inventory_domains(conn, applied_secrets):
        for flags, what in ((0, "live XML"),
                            (libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE,
                             "persistent XML")):
            leaks = _leaks(domain.XMLDesc(flags), markers)
            assert not leaks, f"{domain.name()}'s {what} contains {', '.join(leaks)}"
        logs = [Path(console_log_path(domain.name())),
                Path(f"/var/log/libvirt/qemu/{domain.name()}.log")]
        for log_path in (path for path in logs if path.exists()):
            leaks = _leaks(log_path.read_text(errors="replace"), markers)
            assert not leaks, f"{log_path} contains {', '.join(leaks)}"
    console = Path(console_log_path(applied_secrets.linked))
    assert console.exists(), f"no console log at {console}: nothing was checked"


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_dir_private(applied_secrets, conn):
    state = applied_secrets.state_dir
    entries = [state, *state.rglob("*")]
    files = [path for path in entries if path.is_file()]
    assert any(path.name == "id_ed25519" for path in files), f"no access key in {state}"
    assert any(path.suffix == ".known" for path in files), f"no known_hosts file in {state}"
    wrong = [f"{path} is {_mode(path):o}" for path in entries
             if _mode(path) != (0o700 if path.is_dir() else 0o600)]
    assert not wrong, "state entries not 0700 (dirs) / 0600 (files):\n" + "\n".join(wrong)
    markers = _secret_markers(applied_secrets, _seeds(conn, applied_secrets))
    # The access key's own file is the one place its private half belongs.
    allowed = {"the access key", "a PEM header"}
    for path in files:
        text = path.read_text(errors="replace")
        leaks = [what for what in _leaks(text, markers)
                 if not (path.name == "id_ed25519" and what in allowed)]
        assert not leaks, f"{path} contains {', '.join(leaks)}"


def test_secret_volumes_private(applied_secrets, conn):
    """Seeds (host key, password hash), OS disks and the parent's state are owner-only."""
    checked = []
    for domain in _inventory_domains(conn, applied_secrets):
        record = metadata.read(domain)
        parent = metadata.read(domain, ParentRecord, PARENT_NAMESPACE)
        if record is not None:
            checked += [(record.seed, 0o600), (record.disk, 0o600)]
        if parent is not None:
            checked += [(parent.seed, 0o600), (parent.disk, 0o400), (parent.state_file, 0o600)]
            if parent.ram_file:
                checked.append((os.path.dirname(parent.ram_file), 0o700))
    assert len(checked) >= 7, f"found too few files to check: {checked}"
    wrong = [f"{path} is {_mode(path):o}, expected {mode:o}" for path, mode in checked
             if _mode(path) != mode]
    assert not wrong, "\n".join(wrong)


# -- host key verification against the running desktops --------------------------------


def _expected(domain: libvirt.virDomain, host_key: str) -> readiness.Expected:
    record = metadata.read(domain)
    assert record is not None, f"{domain.name()} has no labctl metadata"
    return readiness.Expected(
        hostname=record.hostname, machine_id=record.machine_id, ssh_address="127.0.0.1",
        ssh_port=record.ssh_port, login_user="root", host_key=host_key,
    )


@pytest.mark.parametrize("which", ["linked", "child"])
def test_readiness_rejects_other_host_key(applied_secrets, conn, which):
    domain = conn.lookupByName(getattr(applied_secrets, which))
    record = metadata.read(domain)
    access = applied_secrets.access_key
    recorded = _expected(domain, record.extra["ssh_host_key"])
    readiness.wait_ready(domain, recorded, access, timeout=120)  # the control: it passes

    other = _expected(domain, keys.generate_ed25519("root@elsewhere").public)
    with pytest.raises(GuestError) as caught:
        readiness.wait_ready(domain, other, access, timeout=120)
    message = str(caught.value)
    assert "SSH host key mismatch" in message, message
    assert domain.name() in message, f"the error does not name the desktop: {message}"


def test_labctl_ssh_rejects_changed_record(applied_secrets, conn):
    """labctl ssh to an instant clone trusts only the key in the domain's record."""
    lab = applied_secrets
    trusted = lab.labctl("ssh", lab.child, "-i", str(lab.path), "--", "echo", "in-guest",
                         timeout=60)
    assert trusted.returncode == 0, f"ssh with the recorded key failed: {describe_run(trusted)}"
    domain = conn.lookupByName(lab.child)
    record = metadata.read(domain)
    recorded_key = record.extra["ssh_host_key"]
    record.extra["ssh_host_key"] = keys.generate_ed25519(f"root@{lab.child}").public
    metadata.write(domain, record)
    try:
        changed = lab.labctl("ssh", lab.child, "-i", str(lab.path), "--", "echo", "in-guest",
                             timeout=60)
    finally:
        record.extra["ssh_host_key"] = recorded_key
        metadata.write(domain, record)
    assert changed.returncode != 0, f"ssh accepted a key other than the record's: {changed}"
    assert "in-guest" not in changed.stdout, "the command ran despite the wrong host key"
    assert "Host key verification failed" in changed.stderr, changed.stderr


def test_labctl_ssh_ignores_edited_known_hosts(applied_secrets):
    """A key written into labctl's known_hosts file is not trusted: the record is."""
    lab = applied_secrets
    known = lab.state_dir / "known_hosts" / f"{lab.linked}.known"
    assert known.exists(), f"labctl ssh wrote no {known}"
    port = known.read_text().split()[0]
    known.write_text(f"{port} {keys.generate_ed25519('root@elsewhere').public}\n")
    result = lab.labctl("ssh", lab.linked, "-i", str(lab.path), "--", "echo", "in-guest",
                        timeout=60)
    assert result.returncode == 0, f"ssh after the edit failed: {describe_run(result)}"
    assert result.stdout.strip() == "in-guest"
    assert _mode(known) == 0o600, f"{known} is {_mode(known):o} after labctl ssh rewrote it"
