"""The identity one desktop gets: generated once, kept across refresh, rendered into its seed."""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass, field

from orchestrator import render
from orchestrator.identity.keys import KeyPair
from orchestrator.storage.seed import Seed

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9.-]{1,253}$")


@dataclass(frozen=True)
class UserAccount:
    name: str
    ssh_authorized_keys: tuple[str, ...] = ()
    password_hash: str = ""
    sudo: bool = False
    shell: str = "/bin/bash"


@dataclass(frozen=True)
class DesktopIdentity:
    """Identity values of one desktop. ``ssh_host_key`` contains a secret, so it has no repr."""

    name: str
    hostname: str
    fqdn: str
    uuid: str
    genid: str
    mac: str
    generation: int
    ssh_host_key: KeyPair = field(repr=False)
    users: tuple[UserAccount, ...] = ()
    timezone: str = ""
    run_once: tuple[str, ...] = ()
    root_authorized_keys: tuple[str, ...] = ()

    @property
    def machine_id(self) -> str:
        """The machine-id systemd derives from the SMBIOS UUID for an empty /etc/machine-id."""
        return uuidlib.UUID(self.uuid).hex

    @property
    def instance_id(self) -> str:
        """cloud-init's instance-id: unique per desktop and identity generation."""
        return f"{self.name}-{self.uuid[:8]}-g{self.generation}"


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def build_seed(identity: DesktopIdentity) -> Seed:
    """Render the NoCloud seed (cloud-init files plus labctl/ files) for ``identity``."""
    for value in (identity.hostname, identity.fqdn, identity.instance_id):
        if not _SAFE_VALUE.match(value):
            raise ValueError(f"unsafe identity value {value!r}")
    context = {
        "hostname": identity.hostname,
        "fqdn": identity.fqdn,
        "machine_id": identity.machine_id,
        "instance_id": identity.instance_id,
        "ssh_host_key": identity.ssh_host_key,
        "timezone": identity.timezone,
        "users": [
            {
                "name": user.name,
                "shell": user.shell,
                "password_hash": user.password_hash,
                "sudo": user.sudo,
                "ssh_authorized_keys": list(user.ssh_authorized_keys),
            }
            for user in identity.users
        ],
        "password_login": any(user.password_hash for user in identity.users),
        "run_once": list(identity.run_once),
    }
    seed = Seed()
    seed.add("meta-data", render.render("cloud-init/meta-data.j2", **context))
    seed.add("user-data", render.render("cloud-init/user-data.j2", **context), private=True)
    seed.add("labctl/identity.env", render.render("cloud-init/identity.env.j2", **context))
    seed.add("labctl/ssh_host_ed25519_key", identity.ssh_host_key.private, private=True)
    seed.add("labctl/ssh_host_ed25519_key.pub", identity.ssh_host_key.public + "\n")
    authorized = list(identity.root_authorized_keys)
    seed.add("labctl/authorized_keys", "".join(f"{line}\n" for line in authorized))
    return seed
