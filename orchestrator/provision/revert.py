"""Refresh of a full clone by reverting its OS disk to the post-customization snapshot.

The desktop keeps its domain, so its name, UUID, MAC, SSH port, seed and assignment
stay as they are. Its identity generation does not change either, so cloud-init reads
the same instance-id and does not run its first-boot modules again. The steps:
mark the record "refreshing", power the domain off, ``qemu-img snapshot -a``, start it,
wait until ready, record it ready.

A failing step marks the desktop "failed" and leaves it shut off, so the next apply
re-creates it with a new copy of the image (and a new snapshot). A run killed midway
leaves the journal operation "snapshot-refresh" running. The next run's recovery then
marks the desktop failed in the same way (see orchestrator/recovery.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import libvirt

from orchestrator import journal
from orchestrator.errors import ImageError
from orchestrator.hosts.connection import is_local
from orchestrator.hosts.context import HostContext
from orchestrator.provision import readiness, snapshot
from orchestrator.provision.request import DesktopRequest
from orchestrator.provision.steps import EventSink, Step, run_steps
from orchestrator.state import metadata
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import qemuimg

log = logging.getLogger(__name__)

OPERATION_KIND = "snapshot-refresh"


def fallback_reason(ctx: HostContext, record: DesktopRecord | None,
                    request: DesktopRequest) -> str:
    """Return why a desktop cannot be refreshed from its snapshot, or "" if it can."""
    if record is None or record.clone != "full":
        return "it is not a full clone"
    name = snapshot.recorded_snapshot(record)
    if not name:
        return "it has no post-customization snapshot (made before snapshots, or taking " \
               "the snapshot failed)"
    if not is_local(ctx.settings.uri):
        return f"its host {ctx.settings.uri} is remote and the revert runs qemu-img locally"
    # The hash covers the clone method too, so a pool changed to linked lands here.
    if request.clone != "full" or record.config_hash != request.config_hash():
        return "its image, clone method, disk, network or identity settings changed"
    try:
        names = qemuimg.snapshot_names(record.disk)
    except ImageError as exc:
        return f"its disk cannot be read: {exc}"
    if name not in names:
        return f"its disk {record.disk} has no internal snapshot {name}"
    return ""


@dataclass
class SnapshotRefresh:
    """State shared by the steps of one full clone's refresh from its snapshot."""

    ctx: HostContext
    request: DesktopRequest
    domain: libvirt.virDomain
    record: DesktopRecord
    access_key: str  # private key for the SSH readiness check
    on_event: EventSink
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.request.name

    def steps(self) -> list[Step]:
        return [
            Step("claim", self.mark_refreshing, self.mark_failed),
            Step("stop", self.stop),
            Step("revert", self.revert),
            Step("start", self.start, self.power_off),
            Step("ready", self.wait_ready),
            Step("record", self.record_ready),
        ]

    def run(self) -> dict[str, float]:
        started = time.monotonic()
        run_steps(self.name, self.steps(), self.on_event, self.begin_operation())
        self.timings["total"] = time.monotonic() - started
        return self.timings

    def begin_operation(self) -> journal.Operation:
        """Record the refresh in the journal. It creates no volume, so it lists none."""
        request = self.request
        return journal.begin(
            OPERATION_KIND, inventory=request.inventory, desktop=self.name, host=request.host,
            uri=self.ctx.settings.uri,
            storage_pool=request.storage_pool or self.ctx.settings.storage_pool,
            artifacts=journal.Artifacts(domain=self.name),
            data={"snapshot": snapshot.recorded_snapshot(self.record), "disk": self.record.disk})

    # -- steps ---------------------------------------------------------------------

    def mark_refreshing(self) -> None:
        self._write_state("refreshing")

    def mark_failed(self) -> None:
        self._write_state("failed")

    def stop(self) -> None:
        """Power the domain off at once, because the refresh discards what the guest wrote.

        A managed save image goes too: its memory belongs to the disk before the revert,
        so resuming it on the reverted disk would corrupt the file system.
        """
        self.power_off()
        if self.domain.hasManagedSaveImage(0):
            self.domain.managedSaveRemove(0)

    def power_off(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            if self.domain.isActive():
                self.domain.destroy()

    def revert(self) -> None:
        started = time.monotonic()
        qemuimg.apply_snapshot(self.record.disk, snapshot.recorded_snapshot(self.record))
        self.timings["revert"] = time.monotonic() - started

    def start(self) -> None:
        started = time.monotonic()
        with self.ctx.power:
            self.domain.create()
        self.timings["start"] = time.monotonic() - started

    def wait_ready(self) -> None:
        record = self.record
        mode = record.extra.get("network_mode", "user")
        address = {"user": "127.0.0.1", "none": ""}.get(mode)
        if address is None:
            address = readiness.guest_address(self.domain, record.mac,
                                              timeout=self.request.ready_timeout)
        expected = readiness.Expected(
            hostname=record.hostname, machine_id=record.machine_id, ssh_address=address,
            ssh_port=record.ssh_port or 22, login_user=record.extra.get("login_user", "root"),
            host_key=record.extra.get("ssh_host_key", ""),
            cloud_init=self.request.image.identity == "cloud-init",
        )
        result = readiness.wait_ready(self.domain, expected, self.access_key,
                                      timeout=self.request.ready_timeout)
        self.timings["boot_to_ready"] = result.total

    def record_ready(self) -> None:
        # A refreshed desktop is free: the session ends, the assignment stays.
        self._write(dataclasses.replace(self.record, state="ready", session_user="",
                                        session_since=""))

    # -- helpers -------------------------------------------------------------------

    def _write_state(self, state: str) -> None:
        self._write(dataclasses.replace(self.record, state=state))

    def _write(self, record: DesktopRecord) -> None:
        record = dataclasses.replace(record, extra=dict(record.extra))
        metadata.write(self.domain, record)
        self.record = record
