"""ClonePrep: give an instant clone its own identity inside the running guest.

A child forked or restored from the parent's memory starts as a copy of the parent:
its clock, RNG state, hostname, machine-id, SSH host key and cloud-init instance are
the parent's. ``cloneprep.sh`` (fixed text, shipped with labctl) replaces all of them
in one guest-agent exec: each value is an argument checked here first, the private
key arrives on standard input, and no shell string is ever built from a value. One
exec instead of one agent round trip per file matters under TCG, where each costs
tens of milliseconds. ``verify`` then reads every value back; a child is not ready
before it passes.

Two guest profiles exist: ``systemd`` (images whose identity comes from cloud-init,
e.g. the debian12 image or a distribution cloud image with qemu-guest-agent) and
``tiny`` (labctl's busybox image, whose init reads the seed).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from importlib import resources

import libvirt

from orchestrator.errors import GuestError
from orchestrator.guest import agent
from orchestrator.identity.desktop import DesktopIdentity

log = logging.getLogger(__name__)

# Seconds the whole ClonePrep script, or one run_once command, may take in the guest.
SCRIPT_TIMEOUT = 60.0
# The largest clock difference that still counts as "stepped to the host's".
CLOCK_TOLERANCE = 2.0
# Above this difference after the script, the clock is stepped once more.
CLOCK_RESTEP = 0.5
CLOUD_DIR = "/var/lib/cloud"
_PLAIN = re.compile(r"^[A-Za-z0-9.-]{1,253}$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


@dataclass(frozen=True)
class Target:
    """The identity ClonePrep gives a child, and the parent's cloud-init instance."""

    identity: DesktopIdentity
    parent_instance_id: str
    profile: str  # "systemd" or "tiny"
    run_once: tuple[str, ...] = ()

    @property
    def instance_file(self) -> str:
        if self.profile == "tiny":
            return "/run/labctl-instance-id"
        return f"{CLOUD_DIR}/data/instance-id"


@dataclass(frozen=True)
class Pending:
    """A ClonePrep script started in the guest and not yet waited for."""

    pid: int
    started: float


def profile_for(image_identity: str) -> str:
    """Return the ClonePrep profile for an image whose ``identity`` is cloud-init or
    labctl-seed."""
    return "tiny" if image_identity == "labctl-seed" else "systemd"


def clock_value(profile: str, epoch: float) -> str:
    """Return the ``date -s @VALUE`` text for ``epoch``: GNU date takes milliseconds,
    busybox only whole seconds."""
    return str(round(epoch)) if profile == "tiny" else f"{epoch:.3f}"


def script_text() -> str:
    return resources.files("orchestrator.instant").joinpath("cloneprep.sh").read_text()


def arguments(target: Target, epoch: float) -> list[str]:
    """The script's argv after ``sh -c TEXT``; every value must be plain."""
    identity = target.identity
    values = [target.profile, clock_value(target.profile, epoch), identity.hostname, identity.fqdn,
              identity.machine_id, identity.instance_id, target.parent_instance_id,
              os.urandom(64).hex()]
    for value in values:
        if not _PLAIN.match(value):
            raise GuestError(f"refusing to send the value {value!r} to the guest",
                             fix="hostnames and ids may contain only letters, digits, . and -")
    key_type, _, rest = identity.ssh_host_key.public.partition(" ")
    blob = rest.split(" ", 1)[0]
    if key_type != "ssh-ed25519" or not _BASE64.match(blob):
        raise GuestError("the SSH host key is not an ed25519 public key line")
    return ["/bin/sh", "-c", script_text(), "labctl-cloneprep", *values, blob]


def start(domain: libvirt.virDomain, target: Target) -> Pending:
    """Start ClonePrep in the guest and return at once (the NIC can be plugged meanwhile).

    The hostname is the script's first step, so a DHCP request from the
    NIC plugged afterwards carries the child's name, not the parent's.
    """
    key = target.identity.ssh_host_key.private.encode()
    argv = arguments(target, time.time())
    return Pending(agent.spawn(domain, argv, stdin=key), time.monotonic())


def finish(domain: libvirt.virDomain, target: Target, pending: Pending) -> dict[str, float]:
    """Wait for the script and the run_once commands; return seconds per step."""
    left = max(1.0, SCRIPT_TIMEOUT - (time.monotonic() - pending.started))
    result = agent.wait_exec(domain, pending.pid, "ClonePrep", timeout=left)
    steps = _steps(result.stdout)
    if result.exit_code != 0 or not steps or steps[-1][0] != "done":
        failed = steps[-1][0] if steps else "start"
        detail = result.stderr.strip().splitlines()
        raise GuestError(
            f"ClonePrep step {failed} failed (exit {result.exit_code})"
            + (f": {detail[-1]}" if detail else ""),
            where=domain.name(), fix="read the guest's console log and journal",
        )
    timings = {name: round(steps[i + 1][1] - uptime, 3)
               for i, (name, uptime) in enumerate(steps[:-1])}
    if target.profile == "systemd":
        started = time.monotonic()
        _run_once(domain, target.run_once)
        timings["run-once"] = time.monotonic() - started
    return timings


def _steps(stdout: str) -> list[tuple[str, float]]:
    steps = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "step":
            steps.append((parts[1], float(parts[2])))
    return steps


def _run_once(domain: libvirt.virDomain, commands: tuple[str, ...]) -> None:
    """Run the pool's run_once commands once per child.

    cloud-init ran them in the parent, for the parent's instance only. They are the
    operator's guest commands, so the guest's shell runs them, as for cloud-init's runcmd.
    """
    for command in commands:
        result = agent.run(domain, ["/bin/sh", "-c", command], timeout=SCRIPT_TIMEOUT)
        if result.exit_code != 0:
            detail = result.stderr.strip().splitlines()
            raise GuestError(
                f"run_once command exited with {result.exit_code}"
                + (f": {detail[-1]}" if detail else ""),
                where=domain.name(), fix="fix the pool's run_once commands",
            )


def verify(domain: libvirt.virDomain, target: Target) -> None:
    """Step the clock once more, read each identity value back; raise GuestError on a mismatch.

    The script set the time it was given at its start, which a busy host can deliver
    seconds late. The time sent with the read-back is taken just before its exec. By now
    TCG has translated the guest's code, so the exec starts quickly (tens of milliseconds
    were measured). guest-set-time is not used because it also runs hwclock in the guest.
    """
    identity = target.identity
    lines = _step_clock_and_read(domain, target).split()
    seen = dict(zip(("hostname", "machine-id", "instance-id"), lines + ["", "", ""]))
    wanted = {"hostname": identity.hostname, "machine-id": identity.machine_id,
              "instance-id": identity.instance_id}
    wrong = [f"{key} {seen[key]!r} (expected {wanted[key]!r})"
             for key in wanted if seen[key] != wanted[key]]
    offset = agent.clock_offset(domain)
    if abs(offset) > CLOCK_RESTEP:
        _step_clock_and_read(domain, target)
        offset = agent.clock_offset(domain)
    if abs(offset) > CLOCK_TOLERANCE:
        wrong.append(f"clock {offset:+.1f} s from the host's")
    if wrong:
        raise GuestError("ClonePrep did not take: " + ", ".join(wrong), where=domain.name(),
                         fix="read the guest's console log and journal")


# Sets the clock to $1 and prints the hostname, machine-id and cloud-init instance-id ($2).
_STEP_AND_READ = 'date -u -s "@$1" >/dev/null && cat /proc/sys/kernel/hostname /etc/machine-id "$2"'


def _step_clock_and_read(domain: libvirt.virDomain, target: Target) -> str:
    argv = ["/bin/sh", "-c", _STEP_AND_READ, "labctl-verify",
            clock_value(target.profile, time.time()), target.instance_file]
    return agent.check_output(domain, argv)
