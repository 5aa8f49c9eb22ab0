"""ClonePrep: give an instant clone its own identity inside the running guest.

A child forked or restored from the parent's memory starts as a copy of the parent:
its hostname, machine-id, SSH host key, cloud-init instance and clock are the
parent's. Each operation below replaces one of them through the QEMU guest agent
(no shell, argv only), with its own timeout; ``verify`` then reads every value back.
A child is not ready before ``verify`` passes.

Two guest profiles exist: ``systemd`` (images whose identity comes from cloud-init,
e.g. the debian12 image or a distribution cloud image with qemu-guest-agent) and
``tiny`` (labctl's busybox image, whose init reads the seed).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from orchestrator.errors import GuestError, LabctlError
from orchestrator.guest import agent
from orchestrator.identity.desktop import DesktopIdentity

log = logging.getLogger(__name__)

# Seconds one ClonePrep operation may take in the guest.
STEP_TIMEOUT = 30.0
# The largest clock difference that still counts as "stepped to the host's".
CLOCK_TOLERANCE = 2.0
CLOUD_DIR = "/var/lib/cloud"
# _IO('R', 0x07): make the kernel reseed its CRNG from the input pool now.
RNDRESEEDCRNG = 0x5207


@dataclass(frozen=True)
class Target:
    """What ClonePrep gives a child, and what the parent had."""

    identity: DesktopIdentity
    parent_instance_id: str
    profile: str  # "systemd" or "tiny"
    run_once: tuple[str, ...] = ()


def profile_for(image_identity: str) -> str:
    """The ClonePrep profile for an image whose ``identity`` is cloud-init or labctl-seed."""
    return "tiny" if image_identity == "labctl-seed" else "systemd"


def run(domain: libvirt.virDomain, target: Target) -> dict[str, float]:
    """Apply every ClonePrep operation in order; return the seconds each took."""
    timings: dict[str, float] = {}
    for name, operation in _operations(target.profile):
        started = time.monotonic()
        try:
            operation(domain, target)
        except LabctlError as exc:
            raise GuestError(f"ClonePrep {name} failed: {exc.message}", where=domain.name(),
                             fix=exc.fix or "read the guest's console log") from exc
        timings[name] = time.monotonic() - started
        log.debug("%s: ClonePrep %s in %.2f s", domain.name(), name, timings[name])
    return timings


def _operations(profile: str) -> list[tuple[str, Callable[[libvirt.virDomain, Target], None]]]:
    operations = [
        ("clock", _step_clock),
        ("rng", _reseed_rng),
        ("hostname", _set_hostname),
        ("machine-id", _set_machine_id),
        ("ssh-host-keys", _replace_host_keys_tiny if profile == "tiny" else _replace_host_keys),
        ("instance-id", _set_instance_tiny if profile == "tiny" else _set_instance),
    ]
    if profile == "systemd":
        operations.append(("run-once", _run_once))
    return operations


# -- operations ----------------------------------------------------------------------


def _step_clock(domain: libvirt.virDomain, _target: Target) -> None:
    agent.set_time(domain)


def _reseed_rng(domain: libvirt.virDomain, target: Target) -> None:
    """Mix host randomness into the guest's pool; systemd guests also force a CRNG reseed.

    Children share the parent's RNG state, so without this two children could draw
    the same "random" numbers. The Debian cloud kernel has no VM Generation ID driver.
    """
    agent.write_file(domain, "/dev/urandom", os.urandom(512), mode=None)
    if target.profile == "systemd":
        agent.check_output(domain, [
            "python3", "-c",
            "import fcntl, os\n"
            "fd = os.open('/dev/urandom', os.O_WRONLY)\n"
            f"fcntl.ioctl(fd, {RNDRESEEDCRNG})\n",
        ], timeout=STEP_TIMEOUT)


def _set_hostname(domain: libvirt.virDomain, target: Target) -> None:
    identity = target.identity
    agent.write_file(domain, "/etc/hostname", f"{identity.hostname}\n".encode())
    agent.check_output(domain, ["hostname", identity.hostname], timeout=STEP_TIMEOUT)
    hosts = f"127.0.0.1\tlocalhost\n127.0.1.1\t{identity.fqdn} {identity.hostname}\n"
    if target.profile == "systemd":
        hosts += "::1\tlocalhost ip6-localhost ip6-loopback\n"
    agent.write_file(domain, "/etc/hosts", hosts.encode())


def _set_machine_id(domain: libvirt.virDomain, target: Target) -> None:
    agent.write_file(domain, "/etc/machine-id", f"{target.identity.machine_id}\n".encode(),
                     mode="444")


def _replace_host_keys(domain: libvirt.virDomain, target: Target) -> None:
    key = target.identity.ssh_host_key
    agent.check_output(domain, ["find", "/etc/ssh", "-maxdepth", "1", "-name",
                                "ssh_host_*", "-delete"], timeout=STEP_TIMEOUT)
    agent.write_file(domain, "/etc/ssh/ssh_host_ed25519_key", key.private.encode(), mode="600")
    agent.write_file(domain, "/etc/ssh/ssh_host_ed25519_key.pub", f"{key.public}\n".encode())
    # try-restart: an image without a running sshd is left without one.
    agent.check_output(domain, ["systemctl", "try-restart", "ssh.service", "sshd.service"],
                       timeout=STEP_TIMEOUT)


def _replace_host_keys_tiny(domain: libvirt.virDomain, target: Target) -> None:
    staged = "/run/labctl-host-key"
    agent.write_file(domain, staged, target.identity.ssh_host_key.private.encode(), mode="600")
    try:
        agent.check_output(domain, ["/sbin/labctl-install-host-key", staged],
                           timeout=STEP_TIMEOUT)
    finally:
        agent.run(domain, ["rm", "-f", staged])


def _set_instance(domain: libvirt.virDomain, target: Target) -> None:
    """Rename cloud-init's instance to the child's, so a cold boot keeps its state."""
    old, new = target.parent_instance_id, target.identity.instance_id
    agent.check_output(domain, ["mv", "-T", f"{CLOUD_DIR}/instances/{old}",
                                f"{CLOUD_DIR}/instances/{new}"], timeout=STEP_TIMEOUT)
    agent.check_output(domain, ["ln", "-sfn", f"{CLOUD_DIR}/instances/{new}",
                                f"{CLOUD_DIR}/instance"], timeout=STEP_TIMEOUT)
    agent.write_file(domain, f"{CLOUD_DIR}/data/instance-id", f"{new}\n".encode())


def _set_instance_tiny(domain: libvirt.virDomain, target: Target) -> None:
    agent.write_file(domain, "/run/labctl-instance-id",
                     f"{target.identity.instance_id}\n".encode())


def _run_once(domain: libvirt.virDomain, target: Target) -> None:
    """The pool's run_once commands, once per child (cloud-init ran them in the parent
    only for the parent's instance, so they run here as the child's own)."""
    for command in target.run_once:
        result = agent.run(domain, ["/bin/sh", "-c", command], timeout=STEP_TIMEOUT)
        if result.exit_code != 0:
            detail = result.stderr.strip().splitlines()
            raise GuestError(
                f"run_once command exited with {result.exit_code}"
                + (f": {detail[-1]}" if detail else ""),
                where=domain.name(), fix="fix the pool's run_once commands",
            )


# -- verification --------------------------------------------------------------------


def verify(domain: libvirt.virDomain, target: Target) -> None:
    """Read each identity value back from the guest; raise GuestError on any mismatch."""
    identity = target.identity
    instance_file = ("/run/labctl-instance-id" if target.profile == "tiny"
                     else f"{CLOUD_DIR}/data/instance-id")
    seen = {
        "hostname": agent.check_output(domain, ["hostname"]).strip(),
        "machine-id": agent.check_output(domain, ["cat", "/etc/machine-id"]).strip(),
        "instance-id": agent.check_output(domain, ["cat", instance_file]).strip(),
    }
    wanted = {"hostname": identity.hostname, "machine-id": identity.machine_id,
              "instance-id": identity.instance_id}
    wrong = [f"{key} {seen[key]!r} (expected {wanted[key]!r})"
             for key in wanted if seen[key] != wanted[key]]
    offset = agent.clock_offset(domain)
    if abs(offset) > CLOCK_TOLERANCE:
        wrong.append(f"clock {offset:+.1f} s from the host's")
    if wrong:
        raise GuestError("ClonePrep did not take: " + ", ".join(wrong), where=domain.name(),
                         fix="read the guest's console log and journal")
