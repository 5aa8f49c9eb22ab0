"""The registry of identity operations: what makes each clone unique, and how it is applied.

Each operation has a name, whether it runs by default, a one-line description and
how it reaches the guest: ``domain`` (the domain XML, before first boot), ``seed``
(the NoCloud identity disk, applied by cloud-init or the tiny image's init at first
boot) or ``agent`` (through the QEMU guest agent on a running guest, for instant
clones after a fork). ``labctl identity list`` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdentityOperation:
    name: str
    default: bool
    description: str
    applied_by: tuple[str, ...]
    detail: str


OPERATIONS: tuple[IdentityOperation, ...] = (
    IdentityOperation(
        "hostname", True, "Set the hostname and FQDN from the pool's hostname pattern.",
        ("seed", "agent"),
        "cloud-init hostname/fqdn and /etc/hosts; verified through the agent",
    ),
    IdentityOperation(
        "machine-id", True, "Give each desktop its own /etc/machine-id.",
        ("seed", "agent"),
        "derived from the SMBIOS UUID; a bootcmd rewrites a populated one; verified",
    ),
    IdentityOperation(
        "ssh-host-keys", True, "Replace SSH host keys with an ed25519 key labctl generates.",
        ("seed", "agent"),
        "image keys deleted; labctl keeps the public key and checks it on every SSH login",
    ),
    IdentityOperation(
        "mac", True, "Give each NIC a MAC address unused by any domain on the host.",
        ("domain",), "52:54:00 prefix; the allocator reads every domain's XML",
    ),
    IdentityOperation(
        "smbios-uuid", True, "Give each domain a random UUID (the guest's SMBIOS UUID).",
        ("domain",), "kept across refresh",
    ),
    IdentityOperation(
        "vm-generation-id", True, "Set a VM Generation ID so guests that read it can reseed.",
        ("domain",), "<genid>; new on every identity generation",
    ),
    IdentityOperation(
        "instance-id", True, "Set cloud-init's instance-id, unique per desktop and generation.",
        ("seed", "agent"), "NAME-UUID8-gN in the seed's meta-data",
    ),
    IdentityOperation(
        "users", True, "Create the pool's users with their SSH keys, password hashes and sudo.",
        ("seed",), "cloud-init users; the inventory's access key is added to each",
    ),
    IdentityOperation(
        "timezone", True, "Set the guest's timezone.", ("seed",), "cloud-init timezone",
    ),
    IdentityOperation(
        "run-once", True, "Run the pool's commands once at first boot.", ("seed",),
        "cloud-init runcmd, once per instance-id",
    ),
)


def operation(name: str) -> IdentityOperation:
    for item in OPERATIONS:
        if item.name == name:
            return item
    raise KeyError(name)
