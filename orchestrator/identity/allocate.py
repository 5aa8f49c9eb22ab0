"""Allocators for values that must be unique on a host: MAC addresses and SSH forward ports."""

from __future__ import annotations

import random
import re
import socket
import threading
import xml.etree.ElementTree as ET

import libvirt

from orchestrator.errors import ConflictError
from orchestrator.identity.reservations import Reservations

MAC_PREFIX = "52:54:00"
_MAC_IN_ARG = re.compile(r"mac=([0-9a-fA-F:]{17})")
_HOSTFWD_PORT = re.compile(r"hostfwd=tcp:[0-9.]*:(\d+)-")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _domain_xmls(conn: libvirt.virConnect) -> list[ET.Element]:
    roots = []
    for domain in conn.listAllDomains(0):
        try:
            roots.append(ET.fromstring(domain.XMLDesc(0)))
        except libvirt.libvirtError:
            continue  # the domain vanished while listing
    return roots


def used_macs(conn: libvirt.virConnect) -> set[str]:
    """Return every MAC address in any domain's XML, including NICs given as QEMU arguments."""
    found: set[str] = set()
    for root in _domain_xmls(conn):
        for mac in root.iterfind("devices/interface/mac"):
            found.add(mac.get("address", "").lower())
        for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
            found.update(match.lower() for match in _MAC_IN_ARG.findall(arg.get("value", "")))
    return found


def used_forward_ports(conn: libvirt.virConnect) -> set[int]:
    found: set[int] = set()
    for root in _domain_xmls(conn):
        for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
            found.update(int(port) for port in _HOSTFWD_PORT.findall(arg.get("value", "")))
    return found


class HostAllocator:
    """Hands out MACs and ports unused on one host, remembering what it handed out.

    With ``reservations``, values that other labctl processes on this machine handed out
    but have not defined in a domain yet are skipped too. Domains defined by other
    programs after the scan are not seen. libvirt rejects a duplicate MAC on the same
    network at start, and the port probe below catches ports that running processes
    have bound.
    """

    def __init__(self, conn: libvirt.virConnect, *, port_range: tuple[int, int] = (22000, 22999),
                 reservations: Reservations | None = None):
        self._lock = threading.Lock()
        self._macs = used_macs(conn)
        self._ports = used_forward_ports(conn)
        self._port_range = port_range
        self._random = random.SystemRandom()
        self._reservations = reservations
        if reservations is not None:
            reservations.prune()

    def _claim(self, kind: str, value: str) -> bool:
        return self._reservations is None or self._reservations.claim(kind, value)

    def mac(self) -> str:
        with self._lock:
            for _ in range(10_000):
                tail = ":".join(f"{self._random.randrange(256):02x}" for _ in range(3))
                candidate = f"{MAC_PREFIX}:{tail}"
                if candidate not in self._macs and self._claim("mac", candidate):
                    self._macs.add(candidate)
                    return candidate
        raise ConflictError("no free MAC address left under 52:54:00")

    def reserve_mac(self, mac: str) -> None:
        """Keep ``mac`` from being handed out (a desktop re-created under its old MAC)."""
        with self._lock:
            self._macs.add(mac.lower())
            self._claim("mac", mac.lower())

    def ssh_port(self) -> int:
        low, high = self._port_range
        ports = list(range(low, high + 1))
        # A random start, because two allocators without reservations (labctl runs on
        # different machines) would otherwise both pick the lowest free port, and the
        # second QEMU would fail to start.
        start = self._random.randrange(len(ports))
        with self._lock:
            for port in ports[start:] + ports[:start]:
                if port not in self._ports and _port_free(port) and self._claim("port", str(port)):
                    self._ports.add(port)
                    return port
        raise ConflictError(
            f"no free TCP port for an SSH forward in {low}-{high} on 127.0.0.1",
            fix="remove unused desktops or widen the port range",
        )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
