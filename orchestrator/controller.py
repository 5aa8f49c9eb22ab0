"""labctl run: keep every pool of an inventory at its policy, one pass after another.

Each pass re-reads the inventory, plans and applies, like `labctl apply` without
--replace: desktops whose image or identity changed are left to `labctl recompose`.
Pools stopped on error are skipped until `labctl clear`. Failed desktops of pools
without stop_on_error are retried with exponential backoff. All desktop state lives in
libvirt and stopped pools in the event database, so a controller that was killed
starts again where it was. The inventory's apply lock is held only while a pass runs,
so checkout, release and apply work between passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import libvirt

from orchestrator import cancel, locks
from orchestrator.apply import ApplyResult, apply_plan
from orchestrator.backoff import Backoff
from orchestrator.errors import ConflictError, HostError, LabctlError
from orchestrator.hosts.connection import lost_libvirtd
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.outage import Outage
from orchestrator.plan import Plan, make_plan
from orchestrator.provision.steps import EventSink
from orchestrator.state import events

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0
# Plan actions that make no desktop: they still run in a pool stopped on error. Every
# other kind (create, replace, a refresh) creates or re-creates desktops.
NOT_PROVISIONING = frozenset({"keep", "outdated", "delete", "update", "start", "held"})


def inventory_lock(inventory: Inventory):
    """Return the inventory's apply lock, which a pass holds while it plans and applies."""
    return locks.exclusive_run(f"inventory:{inventory.name}",
                               f"run on inventory {inventory.name}")


def controller_lock(inventory: Inventory):
    """Return the lock that allows one `labctl run` per inventory on this machine."""
    return locks.exclusive_run(
        f"controller:{inventory.name}", f"run (controller) of inventory {inventory.name}",
        fix="one controller per inventory keeps its pools; stop the other one with "
        "kill -TERM PID first",
    )


@dataclass
class PassReport:
    """The outcome of one pass: the apply result, desktops held back and why, stopped pools."""

    number: int
    result: ApplyResult | None = None
    held: dict[str, str] = field(default_factory=dict)
    stopped_pools: list[str] = field(default_factory=list)
    skipped: str = ""  # why the pass did not run, e.g. an apply of the inventory was running
    error: str = ""

    @property
    def ok(self) -> bool:
        failed = self.result is not None and self.result.failed
        return not (self.error or self.skipped or failed)

    def to_json(self) -> dict:
        result = self.result or ApplyResult()
        return {"event": "pass", "pass": self.number, "created": result.created,
                "updated": result.updated, "deleted": result.deleted,
                "failed": {name: str(error) for name, error in result.failed.items()},
                "held": self.held, "stopped_pools": self.stopped_pools,
                "skipped": self.skipped, "error": self.error}


class InventorySource:
    """The inventory file, re-read at each pass; an invalid edit keeps the last valid one."""

    def __init__(self, path: Path):
        self.path = path
        self.current = load_inventory(path)  # the first load must succeed
        self._last_error = ""

    def reload(self) -> Inventory:
        try:
            loaded = load_inventory(self.path)
        except LabctlError as exc:
            self._report(f"{exc}; keeping the last valid inventory")
            return self.current
        if loaded.name != self.current.name:
            self._report(f"{self.path}: the inventory's name changed from {self.current.name} "
                         f"to {loaded.name}; keeping the last valid inventory (restart labctl "
                         "run to manage the new name)")
            return self.current
        if self._last_error:
            log.info("%s: the inventory is valid again", self.path)
            self._last_error = ""
        self.current = loaded
        return loaded

    def _report(self, message: str) -> None:
        # The same error is logged once, not at every pass.
        if message != self._last_error:
            log.error("%s", message)
            self._last_error = message


class StopRequest:
    """SIGTERM and SIGINT for `labctl run`: the first one ends the loop after the current
    pass and rolls back the desktops in flight (cancel.request). Later ones only log that."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True as soon as a stop is requested."""
        return self._event.wait(seconds)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {number: signal.signal(number, self._handle)
                    for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _handle(self, number: int, _frame: object) -> None:
        if self._event.is_set():
            print("labctl: stopping; the desktops in flight are rolling back, please wait",
                  file=sys.stderr)
            return
        log.warning("%s received: stopping after this pass; desktops in flight roll back",
                    signal.Signals(number).name)
        self._event.set()
        cancel.request()


def hold_actions(plan: Plan, stopped: set[str], backoff: Backoff, now: float) -> dict[str, str]:
    """Turn the actions this pass must not run into "held" ones; return desktop -> reason.

    Held are the provisioning actions of stopped pools and every action on a desktop
    whose retry is not due yet.
    """
    held = {}
    for index, action in enumerate(plan.actions):
        reason = _hold_reason(action.kind, action.pool, action.desktop, stopped, backoff, now)
        if reason:
            plan.actions[index] = dataclasses.replace(action, kind="held", reason=reason)
            held[action.desktop] = reason
    return held


def _hold_reason(kind: str, pool: str, desktop: str, stopped: set[str], backoff: Backoff,
                 now: float) -> str:
    if kind in ("keep", "outdated", "held"):
        return ""
    if pool in stopped and kind not in NOT_PROVISIONING:
        return f"pool {pool} is stopped on error ({kind} waits for labctl clear)"
    wait = backoff.remaining(desktop, now)
    if wait > 0:
        return f"{kind} retried in {wait:.0f} s (failure {backoff.failures(desktop)})"
    return ""


class Controller:
    """The reconcile loop of one inventory."""

    def __init__(self, path: Path, sink: EventSink, report: Callable[[PassReport], None], *,
                 interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.source = InventorySource(path)
        self.sink = sink
        self.report = report
        self.interval = interval
        self.clock = clock
        self.backoff = Backoff()
        self.stop = StopRequest()
        self.passes = 0
        self._announced: set[str] = set()  # stopped pools already logged
        self._last_error = ""
        self.outage = Outage(self.inventory.name, interval)

    @property
    def inventory(self) -> Inventory:
        return self.source.current

    def run(self, *, once: bool = False) -> int:
        """Run passes until SIGTERM or SIGINT (or one pass with ``once``); return the exit code."""
        name = self.inventory.name
        with controller_lock(self.inventory), self.stop.installed():
            schedule = "one pass" if once else f"a pass every {self.interval:g} s"
            log.info("controller of inventory %s started (pid %s, %s)", name, os.getpid(),
                     schedule)
            events.record(name, "controller", f"started ({schedule})")
            report = self._loop(once)
            events.record(name, "controller", f"stopped (passes run: {self.passes})")
            log.info("controller of inventory %s stopped (passes run: %d)", name, self.passes)
        if once and not report.ok and not self.stop.requested:
            return 1
        return 0

    def _loop(self, once: bool) -> PassReport:
        while True:
            report = self.run_pass(raise_errors=once)
            self.report(report)
            if once or self.stop.requested or self.stop.wait(self.outage.wait):
                return report

    def run_pass(self, *, raise_errors: bool = False) -> PassReport:
        """Re-read the inventory, plan and apply once; errors are logged unless raised."""
        self.passes += 1
        report = PassReport(self.passes)
        inventory = self.source.reload()
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(inventory_lock(inventory))
                except ConflictError as exc:
                    report.skipped = str(exc)
                    log.info("inventory %s: pass %d skipped: %s", inventory.name,
                             report.number, exc)
                    return report
                self._converge(inventory, report)
        except (LabctlError, libvirt.libvirtError) as exc:
            error = exc if isinstance(exc, LabctlError) else HostError(
                f"libvirt call failed: {exc.get_error_message()}")
            if raise_errors:
                raise error from exc
            report.error = str(error)
            if lost_libvirtd(exc):
                self.outage.lost(_host_names(inventory), getattr(error, "message", report.error),
                                 self.clock())
            else:
                self._log_pass_error(inventory, report.error)
        else:
            self._last_error = ""
            self._note_hosts(inventory, report)
        return report

    def _note_hosts(self, inventory: Inventory, report: PassReport) -> None:
        """Back off if libvirtd went away during the pass; log when it is back."""
        lost = report.result.lost_hosts if report.result is not None else []
        if lost:
            errors = [str(error) for error in report.result.failed.values()
                      if lost_libvirtd(error)]
            self.outage.lost(_host_names(inventory, lost), errors[0] if errors else
                             "the connection broke", self.clock())
        else:
            self.outage.reached()

    def _converge(self, inventory: Inventory, report: PassReport) -> None:
        plan = make_plan(inventory, build_images=True,
                         progress=lambda message: self.sink("image", "build", message))
        try:
            if self.stop.requested:
                return
            stopped = events.stopped_pools(inventory.name)
            self._announce(inventory, stopped)
            report.stopped_pools = sorted(stopped)
            report.held = hold_actions(plan, set(stopped), self.backoff, self.clock())
            report.result = apply_plan(plan, self.sink)
        finally:
            plan.close()
        if not self.stop.requested:
            self._learn(inventory, plan, report.result)

    def _announce(self, inventory: Inventory, stopped: dict[str, events.PoolError]) -> None:
        """Log once that a pool is stopped, and once that it was cleared."""
        for pool, error in sorted(stopped.items()):
            if pool not in self._announced:
                since = datetime.fromtimestamp(error.time, timezone.utc).isoformat(
                    timespec="seconds")
                log.warning("pool %s is stopped on error since %s (desktop %s: %s); "
                            "run labctl clear %s %s to resume its provisioning",
                            pool, since, error.desktop, error.message, inventory.path, pool)
                self._announced.add(pool)
        for pool in sorted(self._announced - set(stopped)):
            log.info("pool %s was cleared; its provisioning resumes", pool)
            events.record(inventory.name, "resumed", "the pool's error was cleared; "
                          "provisioning resumes", pool=pool)
            self._announced.discard(pool)

    def _learn(self, inventory: Inventory, plan: Plan, result: ApplyResult | None) -> None:
        """Reset the backoff of desktops that succeeded; stop pools or back off on failures."""
        if result is None:
            return
        for desktop in result.created + result.updated + result.deleted:
            self.backoff.succeeded(desktop)
        actions = {action.desktop: action for action in plan.actions}
        for desktop, error in sorted(result.failed.items()):
            if lost_libvirtd(error):
                continue  # the host's fault: the outage backs off the next passes
            action = actions.get(desktop)
            pool = action.pool if action is not None else ""
            policy = inventory.pools.get(pool)
            provisioning = action is not None and action.kind not in NOT_PROVISIONING
            if provisioning and policy is not None and policy.provisioning.stop_on_error:
                self._stop_pool(inventory, pool, desktop, error)
            else:
                self._back_off(inventory, pool, desktop, error)
        self.backoff.keep_only(set(actions))

    def _stop_pool(self, inventory: Inventory, pool: str, desktop: str,
                   error: LabctlError) -> None:
        # apply_plan stops the pool and records the event first; this catches the rest.
        stopped_now = events.stop_pool(inventory.name, pool, desktop,
                                       str(error).removeprefix(f"{desktop}: "))
        if stopped_now:
            events.record(inventory.name, "stopped", f"provisioning stopped: {desktop} failed",
                          pool=pool, desktop=desktop)
        if pool in self._announced:
            return
        self._announced.add(pool)
        log.error("pool %s stopped on error: desktop %s failed: %s; run labctl clear %s %s "
                  "to resume its provisioning", pool, desktop, error, inventory.path, pool)

    def _back_off(self, inventory: Inventory, pool: str, desktop: str,
                  error: LabctlError) -> None:
        delay = self.backoff.failed(desktop, self.clock())
        failures = self.backoff.failures(desktop)
        log.warning("pool %s, desktop %s: failure %d (%s); next attempt in %.0f s",
                    pool, desktop, failures, error, delay)
        events.record(inventory.name, "retry", f"failure {failures}; next attempt in "
                      f"{delay:.0f} s", pool=pool, desktop=desktop)

    def _log_pass_error(self, inventory: Inventory, message: str) -> None:
        # A host that stays unreachable fails every pass: log the error when it changes.
        if message == self._last_error:
            log.debug("inventory %s: pass %d failed again: %s", inventory.name, self.passes,
                      message)
            return
        self._last_error = message
        log.error("inventory %s: pass %d failed: %s; retrying at the next pass",
                  inventory.name, self.passes, message)
        events.record(inventory.name, "pass-failed", message)


def _host_names(inventory: Inventory, keys: list[str] | None = None) -> list[str]:
    """Return the hosts ``keys`` (default: those the pools use) as "NAME (URI)"."""
    if keys is None:
        keys = sorted({pool.host for pool in inventory.pools.values()})
    return [f"{key} ({inventory.hosts[key].uri})" if key in inventory.hosts else key
            for key in keys]
