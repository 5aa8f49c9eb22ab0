"""SSH to desktops with paramiko, the host key checked against the one labctl generated."""

from __future__ import annotations

import base64
import io
import logging
import socket
import time

import paramiko

from orchestrator import cancel
from orchestrator.errors import GuestError, GuestTimeout

log = logging.getLogger(__name__)


def _expected_key(public_line: str) -> paramiko.PKey:
    key_type, blob = public_line.split()[:2]
    if key_type != "ssh-ed25519":
        raise GuestError(f"unsupported host key type {key_type}")
    return paramiko.Ed25519Key(data=base64.b64decode(blob))


def known_hosts_name(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def connect(address: str, port: int, user: str, private_key: str, host_key: str,
            *, timeout: float = 10) -> paramiko.SSHClient:
    """Open an SSH session; a host key other than ``host_key`` is rejected, never accepted."""
    client = paramiko.SSHClient()
    client.get_host_keys().add(known_hosts_name(address, port), "ssh-ed25519",
                               _expected_key(host_key))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(private_key))
    client.connect(
        address, port=port, username=user, pkey=pkey, timeout=timeout,
        banner_timeout=timeout, auth_timeout=timeout, look_for_keys=False,
        allow_agent=False,
    )
    return client


# Consecutive rejected logins after which the access key counts as wrong.
AUTH_ATTEMPTS = 5
# Seconds between connection attempts while sshd is not up yet.
RETRY_SECONDS = 0.25


def wait_for_login(address: str, port: int, user: str, private_key: str, host_key: str,
                   *, timeout: float, name: str) -> float:
    """Wait until SSH login works and ``id -un`` prints ``user``; return seconds waited."""
    start = time.monotonic()
    last_error = "no answer yet"
    rejected = 0
    while time.monotonic() - start < timeout:
        try:
            client = connect(address, port, user, private_key, host_key, timeout=10)
        except paramiko.BadHostKeyException as exc:
            raise GuestError(
                f"SSH host key mismatch on {address}:{port}: got "
                f"{exc.key.get_base64()[:16]}..., expected labctl's key for this desktop",
                where=name, fix="the guest did not apply its identity; re-create it",
            ) from exc
        except paramiko.AuthenticationException as exc:
            # Callers log in only once the guest has created its users, so a key that
            # keeps being rejected will not start working later.
            rejected += 1
            if rejected >= AUTH_ATTEMPTS:
                raise GuestError(
                    f"SSH login as {user} on {address}:{port} was rejected {rejected} times: "
                    f"{exc}", where=name,
                    fix="the guest does not accept the inventory's access key; check "
                    "that the key under ~/.local/share/labctl/state/keys/ is the one the "
                    "desktop was made with",
                ) from exc
            last_error = f"{type(exc).__name__}: {exc}"
            cancel.sleep(1)
            continue
        except (paramiko.SSHException, OSError, EOFError, socket.timeout) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
            cancel.sleep(RETRY_SECONDS)
            continue
        try:
            _stdin, stdout, _stderr = client.exec_command("id -un", timeout=10)
            output = stdout.read().decode().strip()
        finally:
            client.close()
        if output == user:
            return time.monotonic() - start
        last_error = f"id -un printed {output!r}"
        cancel.sleep(1)
    raise GuestTimeout(
        f"SSH login as {user} on {address}:{port} did not work within {timeout:.0f} s "
        f"(last error: {last_error})",
        where=name,
    )
