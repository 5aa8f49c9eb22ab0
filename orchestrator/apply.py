"""apply: carry out a plan, provisioning desktops in parallel up to each host's limit.

Desktops are independent: one failure is reported and the others go on. Deletions
run first so that a renamed pool frees its resources before new desktops need them.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import libvirt

from orchestrator import cancel, journal
from orchestrator.errors import LabctlError
from orchestrator.identity import keys
from orchestrator.plan import Action, Plan
from orchestrator.hosts import facts
from orchestrator.hosts.connection import libvirt_failure, lost_libvirtd
from orchestrator.hosts.context import HostContext
from orchestrator.instant.child import ChildProvisioning
from orchestrator.provision.desktop import KeptIdentity, Provisioning
from orchestrator.provision.request import DesktopRequest
from orchestrator.provision.hardware import update_hardware
from orchestrator.provision import revert
from orchestrator.provision.remove import remove_desktop, remove_unused_bases
from orchestrator.provision.steps import EventSink, Step, run_steps
from orchestrator.instant import parent
from orchestrator.pools import claims, power
from orchestrator.state import events, metadata
from orchestrator.state.recorder import EventRecorder

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, LabctlError] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    # Desktops not made because their pool stopped at a provisioning error in this run.
    held: list[str] = field(default_factory=list)
    # Desktops not tried because the connection to their host's libvirtd broke in this run.
    unreached: list[str] = field(default_factory=list)
    # Hosts (inventory keys) whose libvirtd connection broke in this run.
    lost_hosts: list[str] = field(default_factory=list)


# Actions that create a desktop or its disk; an error in one of them stops a pool with
# provisioning.stop_on_error.
PROVISIONING = ("create", "replace", "outdated", "refresh")


class PoolStopped(LabctlError):
    """A pool stopped at a provisioning error makes no more desktops until labctl clear."""


class HostLost(LabctlError):
    """The connection to the host's libvirtd broke earlier in this run: the desktop is not
    tried on it."""


class LostHosts:
    """The hosts whose libvirtd connection broke in this run, shared by the worker threads.

    The desktops in flight report the broken connection. The desktops not started yet
    are not tried, so a lost libvirtd does not give one more error per desktop.
    """

    def __init__(self) -> None:
        self._lost: list[str] = []
        self._lock = threading.Lock()

    @property
    def hosts(self) -> list[str]:
        with self._lock:
            return list(self._lost)

    def check(self, action: Action) -> None:
        """Raise HostLost if the action's host lost its libvirtd connection."""
        with self._lock:
            lost = action.host in self._lost
        if lost:
            raise HostLost(f"not tried: the connection to host {action.host}'s libvirtd broke",
                           where=action.desktop)

    def failed(self, host: str, error: BaseException) -> bool:
        """Remember ``host`` as lost if ``error`` is a broken libvirtd connection."""
        if not lost_libvirtd(error):
            return False
        with self._lock:
            if host not in self._lost:
                self._lost.append(host)
        return True


class PoolStops:
    """The pools that stopped at a provisioning error, shared by apply's worker threads."""

    def __init__(self, plan: Plan) -> None:
        self.inventory = plan.inventory
        self._stopped = set(plan.stopped)
        self._lock = threading.Lock()

    def check(self, action: Action) -> None:
        """Raise PoolStopped if the action would provision a desktop of a stopped pool."""
        with self._lock:
            stopped = action.pool in self._stopped
        if stopped and action.kind in PROVISIONING:
            raise PoolStopped(
                f"pool {action.pool} stopped at a provisioning error, so {action.desktop} "
                "was not made", where=action.desktop,
                fix=f"see labctl status, fix the cause, then labctl clear "
                f"{self.inventory.path} {action.pool}")

    def failed(self, action: Action, error: LabctlError) -> None:
        """Stop the action's pool if provisioning failed and the pool stops on errors."""
        pool = self.inventory.pools.get(action.pool)
        if action.kind not in PROVISIONING or pool is None:
            return
        if not pool.provisioning.stop_on_error or isinstance(error, (PoolStopped, HostLost)):
            return
        if lost_libvirtd(error) or _interrupted(error):
            return  # the host failed or the user interrupted, not the pool's provisioning
        with self._lock:
            first = action.pool not in self._stopped
            self._stopped.add(action.pool)
        if first:
            # The record names the desktop already, so the message does not repeat it.
            message = str(error).removeprefix(f"{action.desktop}: ")
            if not events.stop_pool(self.inventory.name, action.pool, action.desktop, message):
                return
            log.info("pool %s: stopped at the provisioning error of %s", action.pool,
                     action.desktop)
            events.record(self.inventory.name, "stopped",
                          f"provisioning stopped: {action.desktop} failed",
                          pool=action.pool, desktop=action.desktop)


def _interrupted(error: BaseException) -> bool:
    """Return whether ``error`` or one of its causes is an interruption (cancel.Cancelled)."""
    current: BaseException | None = error
    for _depth in range(16):  # a bound in case a cause refers back to its error
        if current is None:
            return False
        if isinstance(current, cancel.Cancelled):
            return True
        current = current.__cause__ or getattr(current, "cause", None)
    return False


def apply_plan(plan: Plan, on_event: EventSink, *, replace: bool = False) -> ApplyResult:
    result = ApplyResult()
    recorder = EventRecorder(plan.inventory.name, on_event,
                             {a.desktop: (a.pool, a.kind) for a in plan.actions})
    on_event = recorder
    access_key = keys.access_key(plan.inventory.name, create=not _has_desktops(plan))
    for ctx in plan.hosts.values():
        if ctx.settings.ksm is not None:
            facts.set_ksm(ctx.settings.ksm)
            on_event(ctx.settings.name, "ksm",
                     f"kernel same-page merging {'on' if ctx.settings.ksm else 'off'}")
    for action in plan.of_kind("delete"):
        _run(result, action, lambda a=action: _delete(plan, a, on_event), result.deleted,
             recorder)
    work = plan.of_kind("create", "update", "replace", "start", "refresh")
    if replace:
        work += plan.of_kind("outdated")
    else:
        result.skipped = [action.desktop for action in plan.of_kind("outdated")]
    workers = max(1, sum(ctx.settings.max_parallel for ctx in plan.hosts.values()))
    stops = PoolStops(plan)
    lost = LostHosts()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provision") as executor:
        futures = {executor.submit(_converge_or_stop, plan, action, access_key, on_event,
                                   stops, lost): action
                   for action in work}
        try:
            _collect(futures, result, recorder)
        except KeyboardInterrupt:
            # Workers stop at their next wait or step and undo their desktop; leaving
            # the with block waits for them, so nothing half-made stays behind.
            cancel.request()
            raise
    if cancel.requested():
        # The cleanup below waits for the lock of every replica, which another run holds
        # while it copies a full clone's disk, so an interrupted run leaves it to the next.
        log.info("interrupted: unused parent VMs and replicas are removed by the next apply")
        return result
    result.lost_hosts = lost.hosts
    for key, ctx in plan.hosts.items():
        if key in result.lost_hosts:
            continue  # its connection is broken; the next run removes them
        try:
            _remove_unused(plan, key, ctx, on_event)
        except libvirt.libvirtError as exc:
            # Reported with the desktops' errors, which would be lost if this raised.
            result.failed[f"host {key}"] = libvirt_failure(
                "removing unused parent VMs and replicas failed", exc,
                where=f"host {ctx.settings.name}")
    return result


def _remove_unused(plan: Plan, key: str, ctx: HostContext, on_event: EventSink) -> None:
    """Remove the parent VMs and replicas on host ``key`` that nothing uses any more."""
    keep = {parent.parent_key(a.request, a.request.instant, ctx.domain_type)
            for a in plan.actions
            if a.host == key and a.request is not None and a.request.clone == "instant"}
    remove_unused_bases(ctx, plan.inventory.name, keep, on_event)


def _has_desktops(plan: Plan) -> bool:
    return any(action.record is not None for action in plan.actions)


def _collect(futures: dict, result: ApplyResult, recorder: EventRecorder) -> None:
    for future in as_completed(futures):
        action = futures[future]
        try:
            timings = future.result()
        except PoolStopped:
            result.held.append(action.desktop)
            continue
        except HostLost:
            result.unreached.append(action.desktop)
            continue
        except LabctlError as exc:
            result.failed[action.desktop] = exc
            recorder.failed(action.desktop, exc)
            continue
        target = result.updated if action.kind in ("update", "refresh") else result.created
        target.append(action.desktop)
        if timings:
            result.timings[action.desktop] = timings


def _run(result: ApplyResult, action: Action, work, done: list[str],
         recorder: EventRecorder) -> None:
    try:
        work()
    except LabctlError as exc:
        result.failed[action.desktop] = exc
        recorder.failed(action.desktop, exc)
        return
    done.append(action.desktop)


def _delete(plan: Plan, action: Action, on_event: EventSink) -> None:
    ctx = plan.hosts[action.host]
    try:
        domain = ctx.conn.lookupByName(action.desktop)
    except libvirt.libvirtError:
        # Removed by someone else since the plan was made: the deletion is done.
        log.info("%s: already gone, nothing to delete", action.desktop)
        return
    remove_desktop(ctx, domain, plan.inventory.name, on_event)


def note(inventory: str, action: Action, kind: str, message: str) -> None:
    """Log a lifecycle step at INFO and add it to the inventory's event history."""
    log.info("pool %s, desktop %s: %s: %s", action.pool, action.desktop, kind, message)
    events.record(inventory, kind, message, pool=action.pool, desktop=action.desktop)


def _converge_or_stop(plan: Plan, action: Action, access_key: keys.KeyPair,
                      on_event: EventSink, stops: PoolStops,
                      lost: LostHosts) -> dict[str, float]:
    """Converge one desktop unless its pool stopped or its host's libvirtd connection broke;
    a provisioning error may stop the pool."""
    lost.check(action)
    stops.check(action)
    try:
        timings = _converge(plan, action, access_key, on_event)
    except LabctlError as exc:
        lost.failed(action.host, exc)
        stops.failed(action, exc)
        raise
    if action.kind in PROVISIONING:
        _settle_power(plan, action, on_event)
    return timings


def _settle_power(plan: Plan, action: Action, on_event: EventSink) -> None:
    """Apply the pool's power policy to a desktop just made, unless someone uses it."""
    ctx = plan.hosts[action.host]
    domain = ctx.conn.lookupByName(action.desktop)
    record = metadata.read(domain)
    if record is None or record.session_user:
        return
    power.apply_policy(ctx, domain, record, plan.inventory.pools[action.pool].power_policy,
                       on_event)


def _start(ctx: HostContext, name: str, on_event: EventSink) -> None:
    """Start a shut-off desktop under the host's power throttle (limits.power)."""
    with ctx.power:
        on_event(name, "start", "start")
        try:
            ctx.conn.lookupByName(name).create()
        except libvirt.libvirtError as exc:
            on_event(name, "start", "failed")
            raise LabctlError(f"starting the desktop failed: {exc.get_error_message()}",
                              where=name) from exc
        on_event(name, "start", "done")


def _converge(plan: Plan, action: Action, access_key: keys.KeyPair,
              on_event: EventSink) -> dict[str, float]:
    ctx = plan.hosts[action.host]
    assert action.request is not None
    if action.kind == "update":
        update_hardware(ctx, ctx.conn.lookupByName(action.desktop), action.request, on_event)
        return {}
    if action.kind == "start":
        _start(ctx, action.desktop, on_event)
        return {}
    if action.kind in ("replace", "outdated"):
        return recreate_desktop(ctx, plan.inventory.name, action.request, access_key, on_event)
    if action.kind == "refresh":
        return refresh_free(ctx, plan.inventory.name, action.request, access_key, on_event)
    return provision(ctx, action.request, access_key, on_event)


def refresh_free(ctx: HostContext, inventory: str, request: DesktopRequest,
                 access_key: keys.KeyPair, on_event: EventSink) -> dict[str, float]:
    """Refresh a desktop if it is still free; one checked out since the plan waits for its
    release."""
    domain = ctx.conn.lookupByName(request.name)
    if claims.claim_free(domain, inventory, request.pool, "refreshing") is None:
        log.info("%s: in use or busy since the plan; its refresh waits for its release",
                 request.name)
        return {}
    return refresh_desktop(ctx, inventory, request, access_key, on_event)


def refresh_desktop(ctx: HostContext, inventory: str, request: DesktopRequest,
                    access_key: keys.KeyPair, on_event: EventSink) -> dict[str, float]:
    """Bring a desktop back to its state right after customization, keeping its identity.

    A full clone with a post-customization snapshot is reverted to it. Every other
    desktop is re-created (see recreate_desktop). Takes one slot of the host's
    provisioning throttle.
    """
    with ctx.provisioning:
        try:
            domain = ctx.conn.lookupByName(request.name)
        except libvirt.libvirtError:
            return _recreate(ctx, inventory, request, access_key, on_event)
        record = metadata.read(domain)
        reason = revert.fallback_reason(ctx, record, request)
        if not reason:
            assert record is not None
            job = revert.SnapshotRefresh(ctx, request, domain, record, access_key.private,
                                         on_event)
            return job.run()
        if record is not None and record.clone == "full":
            log.info("%s: refreshed with a new copy of the image, not from a snapshot: %s",
                     request.name, reason)
        return _recreate(ctx, inventory, request, access_key, on_event)


def recreate_desktop(ctx: HostContext, inventory: str, request: DesktopRequest,
                     access_key: keys.KeyPair, on_event: EventSink) -> dict[str, float]:
    """Remove a desktop and provision it again under the same name, UUID and MAC.

    An instant clone's parent is made ready first, so the old desktop keeps running
    while a new parent boots. If the new desktop fails or labctl is interrupted, the
    old definition comes back marked "failed": its identity is not lost, and the next
    apply re-creates it. The old definition is in the journal while no domain has it,
    so a killed run's definition comes back at the next apply, refresh or gc. The whole
    re-creation takes one slot of the host's provisioning throttle.
    """
    with ctx.provisioning:
        return _recreate(ctx, inventory, request, access_key, on_event)


def _recreate(ctx: HostContext, inventory: str, request: DesktopRequest,
              access_key: keys.KeyPair, on_event: EventSink) -> dict[str, float]:
    try:
        domain = ctx.conn.lookupByName(request.name)
    except libvirt.libvirtError:
        return _provision(ctx, request, access_key, on_event)
    record = metadata.read(domain)
    if record is None:
        return _provision(ctx, request, access_key, on_event)  # check_name will refuse it
    if request.clone == "instant":
        parent.ensure_parent(ctx, request, request.instant, access_key, on_event)
    kept = KeptIdentity.of(domain, record)
    definition = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    operation = journal.begin(
        "refresh", inventory=inventory, desktop=request.name, host=request.host,
        uri=ctx.settings.uri, storage_pool=request.storage_pool or ctx.settings.storage_pool,
        artifacts=journal.Artifacts(domain=request.name), data={"definition": definition})
    timings: dict[str, float] = {}
    steps = [
        Step("remove-old", lambda: remove_desktop(ctx, domain, inventory, on_event),
             lambda: define_failed(ctx, definition)),
        Step("provision", lambda: timings.update(
            _provision(ctx, request, access_key, on_event, kept=kept))),
    ]
    run_steps(request.name, steps, on_event, operation)
    return timings


def define_failed(ctx: HostContext, definition: str) -> None:
    """Define a desktop's old domain again, shut off and recorded as failed."""
    domain = ctx.conn.defineXML(definition)
    record = metadata.read(domain)
    if record is not None:
        record.state = "failed"
        metadata.write(domain, record)


def provision(ctx: HostContext, request: DesktopRequest, access_key: keys.KeyPair,
              on_event: EventSink, kept: KeptIdentity | None = None) -> dict[str, float]:
    """Provision one desktop of any clone method under the host's provisioning throttle."""
    with ctx.provisioning:
        return _provision(ctx, request, access_key, on_event, kept=kept)


def _provision(ctx: HostContext, request: DesktopRequest, access_key: keys.KeyPair,
               on_event: EventSink, kept: KeptIdentity | None = None) -> dict[str, float]:
    """Provision one desktop; the caller must have acquired a slot of ctx.provisioning."""
    if request.clone == "instant":
        job: Provisioning = ChildProvisioning(ctx, request, access_key, on_event, kept=kept,
                                              method=request.instant)
    else:
        job = Provisioning(ctx, request, access_key, on_event, kept=kept)
    job.run()
    return job.timings


def refresh_desktops(plan: Plan, names: list[str], on_event: EventSink) -> ApplyResult:
    """Refresh desktops under the same name, UUID, MAC and SSH port.

    A full clone with a post-customization snapshot is reverted to it. Other linked and
    full clones get a new OS disk from the replica, and instant clones are re-forked
    from the parent. For those the identity generation goes up, so cloud-init treats the
    clean disk as a new instance of the same desktop.
    """
    result = ApplyResult()
    by_name = {action.desktop: action for action in plan.actions}
    found = []
    for name in names:
        action = by_name.get(name)
        if action is None or action.record is None or action.request is None:
            result.failed[name] = LabctlError(
                f"desktop {name} does not exist in inventory {plan.inventory.name}",
                fix="labctl status lists the desktops; labctl apply creates missing ones")
        else:
            found.append(action)
    if found:
        access_key = keys.access_key(plan.inventory.name, create=False)
    recorder = EventRecorder(plan.inventory.name, on_event,
                             {a.desktop: (a.pool, "refresh") for a in found})
    for action in found:
        _run(result, action, lambda a=action: _refresh(plan, a, access_key, recorder),
             result.updated, recorder)
    return result


def _refresh(plan: Plan, action: Action, access_key: keys.KeyPair,
             on_event: EventSink) -> None:
    assert action.request is not None
    refresh_desktop(plan.hosts[action.host], plan.inventory.name, action.request, access_key,
                    on_event)
