"""SSH keys labctl generates: per-desktop host keys and the per-inventory access key."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestrator import paths
from orchestrator.errors import LabctlError


@dataclass(frozen=True)
class KeyPair:
    private: str  # OpenSSH PEM; a secret: never logged
    public: str   # "ssh-ed25519 AAAA... comment"

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public!r}, private=<redacted>)"


def generate_ed25519(comment: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return KeyPair(private=private, public=f"{public} {comment}")


def fingerprint(public_line: str) -> str:
    """Return the SHA256 fingerprint of an OpenSSH public key line, as ssh-keygen -l prints it."""
    blob = base64.b64decode(public_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def access_key_path(inventory: str) -> Path:
    return paths.state_dir() / "keys" / inventory / "id_ed25519"


def access_key(inventory: str, *, create: bool = True) -> KeyPair:
    """Return the inventory's SSH access key, creating it (mode 0600) on first use.

    ``create=False`` is for inventories that already have desktops: a new key would
    lock labctl out of them, so a missing key is an error.
    """
    private_path = access_key_path(inventory)
    public_path = private_path.with_suffix(".pub")
    if private_path.exists() and public_path.exists():
        return KeyPair(private=private_path.read_text(), public=public_path.read_text().strip())
    if not create:
        raise LabctlError(
            f"the SSH access key of inventory {inventory} is missing, but its desktops "
            "were made with it", where=str(private_path),
            fix="restore the key (and its .pub) from a backup, or run labctl destroy and "
            "apply again",
        )
    paths.ensure_private_dir(private_path.parent)
    pair = generate_ed25519(f"labctl-{inventory}")
    paths.write_private_file(private_path, pair.private.encode())
    paths.write_private_file(public_path, (pair.public + "\n").encode())
    return pair
