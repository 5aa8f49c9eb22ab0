"""Instant clones: a child made from its pool's parent VM, then ClonePrep, then verified.

The child runs first as a transient domain made by the chosen method: ``restore`` (the
parent's save image with the child's XML in its header) or ``fork`` (the parent's RAM
file mapped copy-on-write plus its device state). Its NIC is hot-plugged, ClonePrep
gives it its identity, and its persistent definition is the one of a linked clone on
the parent's disk: a later cold boot works without the parent's memory state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from orchestrator import journal, paths
from orchestrator.domain import DiskLayer, render_domain
from orchestrator.errors import GuestError
from orchestrator.guest import agent, ssh
from orchestrator.instant import cloneprep, fork, nic, savefile
from orchestrator.instant.parent import ParentRecord, ensure_parent
from orchestrator.provision import readiness
from orchestrator.provision.desktop import Provisioning
from orchestrator.provision.steps import Step
from orchestrator.state import metadata

log = logging.getLogger(__name__)

# Seconds each step after the fork may wait (agent, restore, DHCP): the child already
# runs, so it needs seconds, not the cold-boot deadline of a whole desktop.
CHILD_STEP_TIMEOUT = 180.0

# Directory of restore's named pipes: libvirtd on this machine must be able to read it.
FIFO_DIR = "/run/labctl"


@dataclass
class ChildProvisioning(Provisioning):
    method: str = "restore"
    parent: ParentRecord | None = None
    address: str = ""  # the guest's IPv4 address on its NIC

    def steps(self) -> list[Step]:
        return [
            Step("check", self.check_name),
            Step("parent", self.ensure_parent),
            Step("identity", self.make_identity),
            Step("os-disk", self.create_os_disk, self.remove_os_disk),
            Step("seed", self.create_seed, self.remove_seed),
            Step("clone", self.clone, self.undefine),
            Step("cloneprep", self.cloneprep),
            Step("nic", self.wait_for_address),
            Step("verify", self.verify),
            Step("persist", self.persist),
            Step("ready", self.wait_ready),
            Step("record", self.record_ready),
        ]

    def artifacts(self) -> journal.Artifacts:
        """Also restore's FIFO, named after the child with a random part."""
        return journal.Artifacts(
            domain=self.request.name, volumes=(self.os_volume(), self.seed_volume()),
            file_patterns=(savefile.fifo_pattern(FIFO_DIR, self.request.name),))

    # -- steps ---------------------------------------------------------------------

    @property
    def step_timeout(self) -> float:
        return min(self.request.ready_timeout, CHILD_STEP_TIMEOUT)

    def ensure_parent(self) -> None:
        started = time.monotonic()
        self.parent = ensure_parent(self.ctx, self.request, self.method, self.access_key,
                                    self.on_event)
        self.timings["parent"] = time.monotonic() - started

    def backing_layers(self) -> tuple[DiskLayer, ...]:
        assert self.parent is not None and self.replica is not None
        return (DiskLayer(self.parent.disk, "qcow2"), self.replica.disk)

    def clone(self) -> None:
        """Make the running (transient) child from the parent's state."""
        assert self.parent is not None
        started = time.monotonic()
        self.record = self.build_record()
        self.record.extra["parent"] = self.parent.key
        self.record.extra["method"] = self.method
        if self.method == "fork":
            self.domain = self._fork()
        else:
            self.domain = self._restore()
        # libvirt learns that the agent's channel is connected from an event that can
        # arrive a moment after the resume.
        agent.wait_for_agent(self.domain, timeout=self.step_timeout, poll=0.02)
        self.timings["clone"] = time.monotonic() - started

    def _fork(self) -> libvirt.virDomain:
        assert self.parent is not None and self.record is not None
        args = fork.child_args(self.parent.ram_file, self.request.memory_bytes)
        xml = render_domain(self.domain_spec(self.record, nic=False, extra_args=tuple(args)))
        try:
            domain = self.ctx.conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as exc:
            raise GuestError(f"starting the child failed: {exc.get_error_message()}",
                             where=self.request.name) from exc
        self.domain = domain  # so that the undo finds it if the state load fails
        fork.load_device_state(domain, self.parent.state_file, timeout=self.step_timeout)
        domain.resume()
        return domain

    def _restore(self) -> libvirt.virDomain:
        assert self.parent is not None
        assert self.record is not None
        image = savefile.read_save_image(self.parent.state_file)
        spec = self.domain_spec(self.record, nic=False)
        xml = savefile.retarget_xml(
            image.xml, name=spec.name, uuid=spec.uuid, title=spec.title, genid=spec.genid,
            metadata_xml=spec.metadata_xml, console_log=spec.console_log,
            disks={disk.target: disk for disk in self.disks()},
            tcg_cache_mib=spec.tcg_cache_mib,
        )
        paths.ensure_private_dir(Path(FIFO_DIR))
        return savefile.restore_child(self.ctx.conn, image, xml, workdir=FIFO_DIR,
                                      timeout=self.step_timeout)

    def target(self) -> cloneprep.Target:
        assert self.identity is not None and self.parent is not None
        return cloneprep.Target(
            identity=self.identity, parent_instance_id=self.parent.instance_id,
            profile=cloneprep.profile_for(self.request.image.identity),
            run_once=self.request.run_once,
        )

    def cloneprep(self) -> None:
        """Start ClonePrep in the guest, hot-plug the NIC while it runs, wait for it."""
        assert self.domain is not None and self.identity is not None
        started = time.monotonic()
        pending = cloneprep.start(self.domain, self.target())
        nic.hot_plug(self.domain, self.request.network, self.identity.mac, self.ssh_port)
        steps = cloneprep.finish(self.domain, self.target(), pending)
        self.timings.update({f"cloneprep.{key}": value for key, value in steps.items()})
        self.timings["cloneprep"] = time.monotonic() - started

    def wait_for_address(self) -> None:
        """Wait until the guest has an IPv4 address on its NIC (DHCP after the hot-plug)."""
        assert self.domain is not None and self.identity is not None
        started = time.monotonic()
        if self.request.network.mode != "none":
            self.address = readiness.guest_address(self.domain, self.identity.mac,
                                                   timeout=self.step_timeout)
        self.timings["nic"] = time.monotonic() - started

    def verify(self) -> None:
        assert self.domain is not None
        started = time.monotonic()
        cloneprep.verify(self.domain, self.target())
        self.timings["verify"] = time.monotonic() - started

    def persist(self) -> None:
        """Define the child as a linked clone of the parent's disk, for later cold boots.

        The running domain is transient until now; the definition applies from its next
        start, so the fork arguments never reach a persistent definition.
        """
        assert self.record is not None
        self.domain = self.ctx.conn.defineXML(render_domain(self.domain_spec(self.record)))

    def wait_ready(self) -> None:
        """ClonePrep was verified already; what is left is SSH with the child's host key."""
        assert self.identity is not None
        started = time.monotonic()
        if self.request.network.mode != "none":
            address = "127.0.0.1" if self.request.network.mode == "user" else self.address
            ssh.wait_for_login(address, self.ssh_port or 22, self.request.login_user,
                               self.access_key.private, self.identity.ssh_host_key.public,
                               timeout=self.step_timeout, name=self.request.name)
        self.timings["ssh"] = time.monotonic() - started

    def record_ready(self) -> None:
        assert self.domain is not None and self.record is not None
        self.record.state = "ready"
        self.record.ready_seconds = round(sum(
            self.timings.get(key, 0.0)
            for key in ("storage", "clone", "cloneprep", "nic", "verify", "ssh")), 2)
        metadata.write(self.domain, self.record)


def child_method(requested: str, unavailable: str | None) -> str:
    """The method children are made with: fork falls back to restore where it cannot run."""
    return "restore" if requested == "fork" and unavailable else requested

