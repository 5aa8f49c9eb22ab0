"""Host facts for ``labctl host check``, and the accelerator every guest on a host uses."""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt

from orchestrator import paths
from orchestrator.errors import HostError
from orchestrator.hosts import probe
from orchestrator.hosts.connection import is_local

log = logging.getLogger(__name__)

KSM_DIR = Path("/sys/kernel/mm/ksm")
# libvirt's <domain type> for each accelerator.
DOMAIN_TYPES = {"kvm": "kvm", "tcg": "qemu"}


@dataclass
class HostFacts:
    uri: str
    hostname: str
    libvirt_version: str
    qemu_version: str
    accelerator: str
    accelerator_reason: str
    domain_type: str
    libvirt_domain_types: list[str]
    cpus: int
    memory_bytes: int
    free_memory_bytes: int
    storage_pool: str
    storage_path: str
    storage_free_bytes: int
    ksm_available: bool
    ksm_running: bool

    def to_json(self) -> dict:
        return asdict(self)


def _version_string(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def libvirt_domain_types(conn: libvirt.virConnect) -> list[str]:
    """Return the <domain type> values libvirt offers for x86_64 hvm guests."""
    caps = ET.fromstring(conn.getCapabilities())
    found: list[str] = []
    for guest in caps.findall("guest"):
        arch = guest.find("arch")
        if guest.findtext("os_type") != "hvm" or arch is None or arch.get("name") != "x86_64":
            continue
        for domain in arch.findall("domain"):
            kind = domain.get("type", "")
            if kind and kind not in found:
                found.append(kind)
    return found


def decide_accelerator(conn: libvirt.virConnect, uri: str, requested: str = "auto",
                       *, use_cache: bool = True) -> tuple[str, str]:
    """Return (accelerator, reason) for the host behind ``conn``.

    ``requested`` kvm or tcg is taken as the inventory's override; auto probes. The
    probe result is cached per host and boot (the boot id changes on reboot) because a
    failing probe costs its whole deadline.
    """
    offered = libvirt_domain_types(conn)
    if uri.startswith("test:"):
        return "tcg", "libvirt's test driver runs no guests"
    if requested == "tcg":
        return "tcg", "set in the inventory"
    if requested == "kvm":
        if "kvm" not in offered:
            raise HostError(
                "the inventory asks for kvm but libvirt offers no kvm domain type",
                where=uri, fix="set accelerator: auto or tcg for this host",
            )
        return "kvm", "set in the inventory"
    if not is_local(uri):
        # TODO: probe remote hosts by booting the probe sector there over SSH; until
        # then a remote host is trusted when libvirt offers kvm.
        if "kvm" in offered:
            return "kvm", "libvirt offers kvm on the remote host (not probed)"
        return "tcg", "libvirt offers no kvm domain type on the remote host"
    accelerator, reason = _probe_cached(uri, use_cache)
    if accelerator == "kvm" and "kvm" not in offered:
        return "tcg", (f"{reason}, but libvirt offers no kvm domain type (is libvirtd "
                       "running with /dev/kvm masked?)")
    return accelerator, reason


def _probe_cached(uri: str, use_cache: bool) -> tuple[str, str]:
    cache = _cache_file(uri)
    if use_cache and cache.exists():
        cached = json.loads(cache.read_text())
        return cached["accelerator"], cached["reason"] + " (probed earlier in this boot)"
    result = probe.probe_local()
    document = {"accelerator": result.accelerator, "reason": result.reason}
    paths.write_private_file(cache, json.dumps(document).encode())
    return result.accelerator, f"probe: {result.reason}"


def _cache_file(uri: str) -> Path:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    safe = "".join(ch if ch.isalnum() else "_" for ch in uri)
    return paths.state_dir() / "probe" / f"{safe}-{boot_id}.json"


def _ksm() -> tuple[bool, bool]:
    run = KSM_DIR / "run"
    if not run.exists():
        return False, False
    return os.access(run, os.W_OK), run.read_text().strip() == "1"


# Pages KSM scans per wake-up when labctl turns it on: the kernel's default (100) takes
# minutes to merge a few restored guests; 1000 took ~35 s for 8 here.
KSM_PAGES_TO_SCAN = 1000


def ksm_writable() -> bool:
    return _ksm()[0]


def set_ksm(on: bool) -> None:
    """Turn kernel same-page merging on or off on this machine (host-wide)."""
    if on:
        scan = KSM_DIR / "pages_to_scan"
        if int(scan.read_text()) < KSM_PAGES_TO_SCAN:
            scan.write_text(str(KSM_PAGES_TO_SCAN))
    (KSM_DIR / "run").write_text("1" if on else "0")


def gather(conn: libvirt.virConnect, uri: str, *, storage_pool: str, storage_path: str,
           requested: str = "auto", use_cache: bool = False) -> HostFacts:
    """Collect the facts ``labctl host check`` prints, probing the accelerator."""
    accelerator, reason = decide_accelerator(conn, uri, requested, use_cache=use_cache)
    info = conn.getInfo()
    free_bytes, where = _storage_free(conn, storage_pool, storage_path)
    ksm_available, ksm_running = _ksm() if is_local(uri) else (False, False)
    return HostFacts(
        uri=uri,
        hostname=conn.getHostname(),
        libvirt_version=_version_string(conn.getLibVersion()),
        qemu_version=_version_string(conn.getVersion()),
        accelerator=accelerator,
        accelerator_reason=reason,
        domain_type=DOMAIN_TYPES[accelerator],
        libvirt_domain_types=libvirt_domain_types(conn),
        cpus=int(info[2]),
        memory_bytes=int(info[1]) * 1024 * 1024,
        free_memory_bytes=int(conn.getFreeMemory()),
        storage_pool=storage_pool,
        storage_path=where,
        storage_free_bytes=free_bytes,
        ksm_available=ksm_available,
        ksm_running=ksm_running,
    )


def _storage_free(conn: libvirt.virConnect, pool_name: str, fallback: str) -> tuple[int, str]:
    """Free bytes of the labctl storage pool, or of the filesystem that will hold it."""
    try:
        pool = conn.storagePoolLookupByName(pool_name)
    except libvirt.libvirtError:
        pool = None
    if pool is not None and pool.isActive():
        pool.refresh(0)
        target = ET.fromstring(pool.XMLDesc()).findtext("target/path") or fallback
        return int(pool.info()[3]), target
    probe_path = Path(fallback)
    while not probe_path.exists() and probe_path != probe_path.parent:
        probe_path = probe_path.parent
    stats = os.statvfs(probe_path)
    return stats.f_bavail * stats.f_frsize, fallback
