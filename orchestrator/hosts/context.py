"""A host ready for provisioning: connection, accelerator, storage pool and throttles."""

from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import libvirt

from orchestrator.domain import DEFAULT_EMULATOR
from orchestrator.errors import StorageError
from orchestrator.hosts import facts
from orchestrator.hosts.connection import open_connection
from orchestrator.identity.allocate import HostAllocator
from orchestrator.identity.reservations import Reservations
from orchestrator.storage import pool as storage_pool

log = logging.getLogger(__name__)


@dataclass
class HostSettings:
    """A host as the inventory describes it."""

    name: str = "local"
    uri: str = "qemu:///system"
    accelerator: str = "auto"
    storage_pool: str = "labctl"
    storage_path: str = "/var/lib/labctl/pool"
    max_parallel: int = 2  # provisioning operations at once (hosts.NAME.limits)
    power_parallel: int = 4
    maintenance_parallel: int = 1
    ksm: bool | None = None  # turn KSM on or off at apply; None leaves it as it is
    tcg_cache_mib: int = 256  # TCG guests' translated-code cache (hosts.NAME.tcg_cache)
    ready_timeout: float | None = None  # seconds; None takes the accelerator's default
    # More storage pools of the host (hosts.NAME.storage_pools): name -> directory.
    storage_pools: dict[str, str] = field(default_factory=dict)


@dataclass
class HostContext:
    settings: HostSettings
    conn: libvirt.virConnect
    accelerator: str
    accelerator_reason: str
    emulator: str
    allocator: HostAllocator
    provisioning: threading.Semaphore
    power: threading.Semaphore
    maintenance: threading.Semaphore
    _pool: libvirt.virStoragePool | None = field(default=None, repr=False)
    _more_pools: dict[str, libvirt.virStoragePool] = field(default_factory=dict, repr=False)

    @property
    def domain_type(self) -> str:
        return facts.DOMAIN_TYPES[self.accelerator]

    @property
    def pool(self) -> libvirt.virStoragePool:
        """The labctl storage pool, defined and started on first use (not at plan time)."""
        if self._pool is None:
            self._pool = storage_pool.ensure_pool(
                self.conn, self.settings.storage_pool, self.settings.storage_path
            )
        return self._pool

    def storage(self, name: str = "") -> libvirt.virStoragePool:
        """Return the storage pool ``name`` (empty: the host's own), defined and started on first
        use."""
        if not name or name == self.settings.storage_pool:
            return self.pool
        if name not in self._more_pools:
            path = self.settings.storage_pools.get(name)
            if path is None:
                raise StorageError(
                    f"storage pool {name} is not a storage pool of host {self.settings.name}",
                    where=self.settings.uri,
                    fix=f"list it under hosts.{self.settings.name}.storage_pools",
                )
            self._more_pools[name] = storage_pool.ensure_pool(self.conn, name, path)
        return self._more_pools[name]

    def storage_paths(self) -> dict[str, str]:
        """Return every storage pool of the host (its own first) as name -> directory."""
        return {self.settings.storage_pool: self.settings.storage_path,
                **self.settings.storage_pools}

    def existing_pools(self) -> list[libvirt.virStoragePool]:
        """Return the host's storage pools that exist, without creating any."""
        found = []
        for name in self.storage_paths():
            try:
                found.append(self.conn.storagePoolLookupByName(name))
            except libvirt.libvirtError:
                continue
        return found

    def existing_pool(self) -> libvirt.virStoragePool | None:
        """Return the storage pool if it exists, without creating it."""
        if self._pool is not None:
            return self._pool
        try:
            return self.conn.storagePoolLookupByName(self.settings.storage_pool)
        except libvirt.libvirtError:
            return None

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass


def open_host(settings: HostSettings, *, probe: bool = True) -> HostContext:
    """Connect to a host and decide its accelerator (probe cached per boot)."""
    conn = open_connection(settings.uri)
    if probe:
        accelerator, reason = facts.decide_accelerator(conn, settings.uri, settings.accelerator)
    else:
        accelerator, reason = "tcg", "not probed"
    return HostContext(
        settings=settings,
        conn=conn,
        accelerator=accelerator,
        accelerator_reason=reason,
        emulator=_emulator(conn, facts.DOMAIN_TYPES[accelerator]),
        allocator=HostAllocator(conn, reservations=Reservations(settings.uri)),
        provisioning=threading.Semaphore(max(1, settings.max_parallel)),
        power=threading.Semaphore(max(1, settings.power_parallel)),
        maintenance=threading.Semaphore(max(1, settings.maintenance_parallel)),
    )


def _emulator(conn: libvirt.virConnect, domain_type: str) -> str:
    """Return the QEMU binary libvirt uses for x86_64 guests of ``domain_type`` on the host."""
    try:
        caps = conn.getDomainCapabilities(None, "x86_64", "pc", domain_type, 0)
    except libvirt.libvirtError:
        return DEFAULT_EMULATOR
    return ET.fromstring(caps).findtext("path") or DEFAULT_EMULATOR
