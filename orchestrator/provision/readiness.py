"""Desktop readiness: the agent responds, the identity read back matches, SSH works."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import libvirt

from orchestrator import cancel
from orchestrator.errors import GuestError, GuestTimeout
from orchestrator.guest import agent, ssh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expected:
    hostname: str
    machine_id: str
    ssh_address: str
    ssh_port: int
    login_user: str
    host_key: str
    cloud_init: bool = False


@dataclass(frozen=True)
class Readiness:
    agent_seconds: float
    identity_seconds: float
    ssh_seconds: float

    @property
    def total(self) -> float:
        return self.agent_seconds + self.identity_seconds + self.ssh_seconds


def wait_ready(domain: libvirt.virDomain, expected: Expected, access_key: str, *,
               timeout: float) -> Readiness:
    """Wait for the three readiness checks in order; each names what it waited for."""
    deadline = time.monotonic() + timeout
    agent_seconds = agent.wait_for_agent(domain, timeout=_left(deadline))
    identity_seconds = wait_identity(domain, expected, timeout=_left(deadline))
    if expected.cloud_init:
        identity_seconds += wait_cloud_init(domain, timeout=_left(deadline))
    ssh_seconds = 0.0
    if expected.ssh_address:  # empty for a desktop without a NIC
        ssh_seconds = ssh.wait_for_login(
            expected.ssh_address, expected.ssh_port, expected.login_user, access_key,
            expected.host_key, timeout=_left(deadline), name=domain.name(),
        )
    return Readiness(agent_seconds, identity_seconds, ssh_seconds)


def _left(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def read_identity(domain: libvirt.virDomain) -> tuple[str, str]:
    """Return (hostname, machine-id) as the guest reports them through the agent."""
    hostname = agent.check_output(domain, ["hostname"]).strip()
    machine_id = agent.check_output(domain, ["cat", "/etc/machine-id"]).strip()
    return hostname, machine_id


def wait_identity(domain: libvirt.virDomain, expected: Expected, *, timeout: float) -> float:
    """Poll until the guest's hostname and machine-id are the expected ones."""
    start = time.monotonic()
    seen = ("", "")
    while True:
        try:
            seen = read_identity(domain)
        except GuestError as exc:
            log.debug("%s: identity not readable yet: %s", domain.name(), exc)
        if seen == (expected.hostname, expected.machine_id):
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            raise GuestTimeout(
                f"guest identity did not match within {timeout:.0f} s: hostname "
                f"{seen[0]!r} (expected {expected.hostname!r}), machine-id {seen[1]!r} "
                f"(expected {expected.machine_id!r})",
                where=domain.name(),
                fix="check that the image applies the NoCloud seed (cloud-init) and read "
                "the console log",
            )
        cancel.sleep(1)


def wait_cloud_init(domain: libvirt.virDomain, *, timeout: float) -> float:
    """Wait until cloud-init has finished every stage; raise GuestError if it reports errors.

    cloud-init sets the hostname early but users, timezone and run-once commands later,
    so a desktop is not ready before `cloud-init status` reports done.
    """
    start = time.monotonic()
    status = ""
    while time.monotonic() - start < timeout:
        try:
            status = agent.run(domain, ["cloud-init", "status"]).stdout.strip()
        except GuestError as exc:
            log.debug("%s: cloud-init status not readable yet: %s", domain.name(), exc)
        if "status: done" in status:
            return time.monotonic() - start
        if "status: error" in status or "status: degraded" in status:
            detail = agent.run(domain, ["cloud-init", "status", "--long"]).stdout
            errors = [line.strip() for line in detail.splitlines()
                      if line.strip() and not line.startswith(("status", "time", "detail"))]
            raise GuestError(
                f"cloud-init finished with errors: {'; '.join(errors[-3:]) or status}",
                where=domain.name(),
                fix="check run_once commands and users; the guest's "
                "/var/log/cloud-init-output.log has the details",
            )
        cancel.sleep(2)
    raise GuestTimeout(f"cloud-init did not finish within {timeout:.0f} s (last: {status!r})",
                       where=domain.name())


def guest_address(domain: libvirt.virDomain, mac: str, *, timeout: float) -> str:
    """Return the guest's IPv4 address on the NIC with ``mac`` (libvirt networks, bridges)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            interfaces = agent.command(domain, "guest-network-get-interfaces")
        except GuestError:
            interfaces = []
        for interface in interfaces or []:  # type: ignore[union-attr]
            if str(interface.get("hardware-address", "")).lower() != mac.lower():
                continue
            for address in interface.get("ip-addresses", []):
                if address.get("ip-address-type") == "ipv4":
                    return str(address["ip-address"])
        cancel.sleep(0.2)
    raise GuestTimeout(f"no IPv4 address on the NIC {mac} within {timeout:.0f} s",
                       where=domain.name(), fix="check DHCP on the network")
