"""A host whose libvirtd the controller lost: one warning, then longer and longer waits.

`labctl run` opens new libvirt connections at every pass, so it reconnects by itself
once libvirtd accepts connections again. Until then each pass fails at once, so this
class logs one warning per outage and spaces the passes out.
"""

from __future__ import annotations

import logging

from orchestrator.backoff import Backoff
from orchestrator.state import events

log = logging.getLogger(__name__)

MAX_WAIT = 300.0  # seconds between passes at most while libvirtd is down
_KEY = "libvirtd"


class Outage:
    """The hosts of one inventory that lost libvirtd, and the wait before the next pass."""

    def __init__(self, inventory: str, interval: float):
        self.inventory = inventory
        self.interval = interval
        self._backoff = Backoff(first=interval, maximum=max(interval, MAX_WAIT))
        self.hosts: list[str] = []  # as "NAME (URI)"
        self.wait = interval

    def lost(self, hosts: list[str], error: str, now: float) -> None:
        """Count a pass that met a lost libvirtd on ``hosts`` and warn once per host."""
        self.wait = self._backoff.failed(_KEY, now)
        for host in hosts:
            if host in self.hosts:
                log.debug("host %s: libvirtd still unreachable: %s", host, error)
                continue
            self.hosts.append(host)
            log.warning("host %s: lost the connection to libvirtd (%s); the next pass "
                        "opens a new connection, passes back off up to %.0f s while "
                        "libvirtd is down", host, error, self._backoff.maximum)
            events.record(self.inventory, "host-lost", f"host {host}: lost the connection "
                          f"to libvirtd: {error}")

    def reached(self) -> None:
        """Log each host that is back after a pass that reached every host; reset the wait."""
        for host in self.hosts:
            log.info("host %s: connected to libvirtd again after %d failed passes",
                        host, self._backoff.failures(_KEY))
            events.record(self.inventory, "reconnected", f"host {host}: connected to "
                          "libvirtd again")
        self.hosts = []
        self._backoff.succeeded(_KEY)
        self.wait = self.interval
