"""Desktop requests: the input of provisioning, built from the inventory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from orchestrator.identity.desktop import UserAccount
from orchestrator.images.catalog import ImageVersion


DEFAULT_USER = "labctl"


@dataclass(frozen=True)
class NetworkSpec:
    """``mode`` user (restricted QEMU user networking, SSH on 127.0.0.1), network or bridge."""

    name: str = "user"
    mode: str = "user"
    source: str = ""


@dataclass(frozen=True)
class DesktopRequest:
    name: str
    inventory: str
    pool: str
    index: int
    clone: str
    image: ImageVersion
    host: str
    vcpus: int = 1
    memory_bytes: int = 512 << 20
    disk_bytes: int = 0
    network: NetworkSpec = field(default_factory=NetworkSpec)
    hostname: str = ""
    domain: str = ""
    users: tuple[UserAccount, ...] = ()
    timezone: str = ""
    run_once: tuple[str, ...] = ()
    ready_timeout: float = 900.0
    inventory_path: str = ""
    # Instant clones: the method their children are made with on this host.
    instant: str = ""
    share_memory: bool = True
    # Under TCG, the translated-code cache in MiB (0: the host's tcg_cache).
    tcg_cache_mib: int = 0
    # The storage pool of the desktop's volumes (empty: the host's own); plan places it.
    storage_pool: str = ""

    @property
    def fqdn(self) -> str:
        host = self.hostname or self.name
        return f"{host}.{self.domain}" if self.domain else host

    @property
    def disk_size(self) -> int:
        return max(self.disk_bytes, self.image.virtual_size)

    @property
    def login_users(self) -> tuple[UserAccount, ...]:
        """The pool's users, or labctl's own sudo user when a cloud-init pool declares none.

        cloud-init images disable root logins, so without any user no one could log in.
        """
        if self.users or self.image.identity != "cloud-init":
            return self.users
        return (UserAccount(DEFAULT_USER, sudo=True),)

    @property
    def login_user(self) -> str:
        """The account ``labctl ssh`` and the readiness check log in as."""
        if self.image.identity == "labctl-seed":
            return "root"
        return self.login_users[0].name

    def config_hash(self) -> str:
        """Hash of everything that, when changed, makes the desktop out of date."""
        data = asdict(self)
        data["image"] = self.image.ref
        # Hardware changes are applied in place (see hardware_hash), not by re-creating.
        for volatile in ("name", "index", "ready_timeout", "vcpus", "memory_bytes",
                         "inventory_path", "storage_pool", "tcg_cache_mib"):
            data.pop(volatile)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def hardware_hash(self) -> str:
        data = {"vcpus": self.vcpus, "memory": self.memory_bytes}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
