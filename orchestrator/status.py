"""status: the desktops of an inventory as libvirt reports them, with their disk chains."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import libvirt

from orchestrator.errors import ImageError
from orchestrator.hosts.context import HostContext
from orchestrator.instant.parent import ParentRecord, inventory_parents
from orchestrator.plan import observed_desktops
from orchestrator.provision import snapshot
from orchestrator.state import events
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import qemuimg

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
}


def desktop_status(domain: libvirt.virDomain, record: DesktopRecord) -> dict:
    state = _STATES.get(domain.state()[0], "unknown")
    if state == "shut off" and domain.hasManagedSaveImage(0):
        state = "saved"  # managed save: its memory is on disk, start resumes it
    if record.state != "ready":
        state = f"{state}, {record.state}"
    return {
        "name": domain.name(),
        "pool": record.pool,
        "host": record.host,
        "clone": record.clone,
        "state": state,
        "uuid": domain.UUIDString(),
        "mac": record.mac,
        "hostname": record.hostname,
        "fqdn": record.fqdn,
        "machine_id": record.machine_id,
        "image": record.image,
        "disk": {"path": record.disk, "format": "qcow2", "backing_chain": _chain(record.disk)},
        "seed": record.seed,
        "ssh": {"address": "127.0.0.1", "port": record.ssh_port,
                "user": record.extra.get("login_user", "")} if record.ssh_port else None,
        "ssh_host_key": record.extra.get("ssh_host_key", ""),
        "ready_seconds": record.ready_seconds,
        "created": record.created,
        "generation": record.generation,
        "assigned_to": record.assigned_to,
        "session": {"user": record.session_user, "since": record.session_since}
        if record.session_user else None,
        "snapshot": _snapshot(record),
    }


def _snapshot(record: DesktopRecord) -> dict | None:
    """Return a full clone's post-customization snapshot: name, time taken and age."""
    age = snapshot.snapshot_age(record)
    if age is None:
        return None
    return {"name": snapshot.recorded_snapshot(record),
            "taken": record.extra.get(snapshot.TAKEN_KEY, ""), "age_seconds": age}


def _chain(path: str) -> list[dict]:
    try:
        layers = qemuimg.backing_chain(path)
    except ImageError as exc:
        return [{"path": path, "error": exc.message}]
    return [{"path": layer.path, "format": layer.format} for layer in layers]


def collect(inventory, hosts: dict[str, HostContext]) -> dict:
    """Return ``{"pools": [{"name", "clone", "desktops": [...]}]}`` for the inventory."""
    desktops: list[dict] = []
    for ctx in hosts.values():
        for _name, (domain, record) in sorted(observed_desktops(ctx, inventory.name).items()):
            try:
                desktops.append(desktop_status(domain, record))
            except libvirt.libvirtError:
                continue  # removed by another run since the listing
    pools = []
    stopped = events.stopped_pools(inventory.name)
    for key, pool in inventory.pools.items():
        members = sorted((d for d in desktops if d["pool"] == key), key=lambda d: d["name"])
        pools.append({"name": key, "clone": pool.clone, "desktops": members,
                      "error": _pool_error(stopped.get(key))})
    orphans = [d for d in desktops if d["pool"] not in inventory.pools]
    if orphans:
        pools.append({"name": "(removed from the inventory)", "clone": "", "desktops": orphans})
    parents = [parent_status(domain, record) for ctx in hosts.values()
               for domain, record in inventory_parents(ctx.conn, inventory.name)]
    return {"inventory": inventory.name, "pools": pools,
            "parents": sorted(parents, key=lambda p: (p["pool"], p["created"]))}


def _pool_error(error: events.PoolError | None) -> dict | None:
    """Return the error that stopped a pool's provisioning, with its time in ISO 8601 UTC."""
    if error is None:
        return None
    when = datetime.fromtimestamp(error.time, timezone.utc).isoformat(timespec="seconds")
    return {"time": when, "desktop": error.desktop, "message": error.message}


def parent_status(domain: libvirt.virDomain, record: ParentRecord) -> dict:
    """A parent VM: its method, the size of its saved state and RAM, and its age."""
    try:
        created = datetime.fromisoformat(record.created)
        age = int((datetime.now(timezone.utc) - created).total_seconds())
    except ValueError:
        age = -1
    return {
        "name": domain.name(), "pool": record.pool, "host": record.host,
        "image": record.image, "method": record.method, "state": record.state,
        "state_file": record.state_file, "state_bytes": record.state_bytes,
        "ram_file": record.ram_file, "ram_bytes": _size(record.ram_file),
        "created": record.created, "age_seconds": age,
        "build_seconds": record.build_seconds,
    }


def _size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512 if path else 0
    except OSError:
        return 0
