"""A full clone's post-customization snapshot: an internal qcow2 snapshot of its OS disk.

It is taken online, once the desktop is first ready (cloud-init finished, SSH checked),
with QMP ``blockdev-snapshot-internal-sync`` on the disk's format node. The guest agent's
``guest-fsfreeze-freeze`` makes it consistent at the file system level. A guest whose
agent cannot freeze is paused around the snapshot instead, which gives a crash-consistent
disk. The snapshot lives inside the one qcow2 file, so copies of the whole file (a
rebalance move) keep it. A refresh reverts the disk to it (orchestrator/provision/revert.py).

The record of the desktop stores the snapshot's name and time in ``extra``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import libvirt
import libvirt_qemu

from orchestrator.errors import GuestError, StorageError
from orchestrator.guest import agent
from orchestrator.state.metadata import DesktopRecord

log = logging.getLogger(__name__)

# The name of the snapshot inside the qcow2 file, and the record's keys for it.
SNAPSHOT_NAME = "labctl-customized"
NAME_KEY = "snapshot"
TAKEN_KEY = "snapshot_taken"

# Seconds the agent gets to freeze the guest's file systems (it flushes them first).
FREEZE_TIMEOUT = 30


def recorded_snapshot(record: DesktopRecord) -> str:
    """Return the name of the desktop's recorded snapshot, or "" if it has none."""
    return record.extra.get(NAME_KEY, "")


def snapshot_age(record: DesktopRecord) -> int | None:
    """Return the age of the recorded snapshot in seconds, or None without one."""
    taken_at = record.extra.get(TAKEN_KEY, "")
    if not recorded_snapshot(record) or not taken_at:
        return None
    try:
        when = datetime.fromisoformat(taken_at)
    except ValueError:
        return None
    return int((datetime.now(timezone.utc) - when).total_seconds())


def take_snapshot(domain: libvirt.virDomain, disk: str, record: DesktopRecord) -> None:
    """Take the internal snapshot of the running domain's ``disk`` and note it in ``record``.

    Raises StorageError if QEMU rejects the snapshot. A finally block thaws or resumes
    the guest in every case.
    """
    node = format_node(domain, disk)
    frozen = _freeze(domain)
    paused = False
    try:
        if not frozen:
            domain.suspend()
            paused = True
        _qmp(domain, "blockdev-snapshot-internal-sync", {"device": node, "name": SNAPSHOT_NAME})
    finally:
        if frozen:
            _thaw(domain)
        if paused:
            domain.resume()
    record.extra[NAME_KEY] = SNAPSHOT_NAME
    record.extra[TAKEN_KEY] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    method = "file systems frozen" if frozen else "domain paused"
    log.info("%s: took internal snapshot %s of %s (%s)", domain.name(), SNAPSHOT_NAME, disk,
             method)


def format_node(domain: libvirt.virDomain, disk: str) -> str:
    """Return the QEMU node name of the qcow2 format layer that opens ``disk``.

    libvirt 9 starts QEMU with -blockdev, so the drive has node names (e.g.
    ``libvirt-2-format``) and an empty legacy device name.
    """
    for device in _qmp(domain, "query-block"):
        inserted = device.get("inserted") or {}
        if inserted.get("file") == disk and inserted.get("node-name"):
            return str(inserted["node-name"])
    raise StorageError(f"QEMU has no block node for {disk}", where=domain.name(),
                       fix="check that the domain runs and its OS disk is that file")


def _freeze(domain: libvirt.virDomain) -> bool:
    """Freeze the guest's file systems and return True, or return False if the agent cannot."""
    try:
        agent.command(domain, "guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
    except GuestError as exc:
        log.info("%s: guest agent cannot freeze the file systems (%s), so the domain is "
                 "paused for the snapshot instead", domain.name(), exc.message)
        # A freeze that timed out may still have frozen the guest.
        _thaw(domain)
        return False
    return True


def _thaw(domain: libvirt.virDomain) -> None:
    try:
        agent.command(domain, "guest-fsfreeze-thaw", timeout=FREEZE_TIMEOUT)
    except GuestError as exc:
        log.warning("%s: thawing the guest's file systems failed: %s", domain.name(),
                    exc.message)


def _qmp(domain: libvirt.virDomain, execute: str, arguments: dict | None = None) -> object:
    """Send one QMP command through libvirt and return its ``return`` value.

    NOTE: libvirt marks the domain tainted (custom-monitor) after the first such command.
    """
    request: dict[str, object] = {"execute": execute}
    if arguments is not None:
        request["arguments"] = arguments
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, json.dumps(request), 0))
    except libvirt.libvirtError as exc:
        raise StorageError(f"QMP {execute} failed: {exc.get_error_message()}",
                           where=domain.name(),
                           fix="check that the domain runs and libvirtd is reachable") from exc
    if "error" in reply:
        raise StorageError(f"QMP {execute} failed: {reply['error'].get('desc', reply['error'])}",
                           where=domain.name(),
                           fix="read libvirt's log of the domain for QEMU's messages")
    return reply.get("return")
