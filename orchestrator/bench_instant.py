"""labctl bench --instant: cold-booted linked clones against instant clones, in one run.

Three pools of the same hardware and user network run on the local host: ``linked``
(each desktop boots from its overlay), ``restore`` and ``fork`` (instant clones made
from the pool's parent VM). Each pool starts at ``count`` desktops. Then one pool at a
time grows to ``big`` (the inventory is written again with its bigger size and applied,
which creates only the missing desktops), is measured, and shrinks back to ``count``, so
the host never runs three pools of ``big`` desktops at once. Everything goes through the same code as
``labctl apply`` on a throw-away inventory in a temporary directory, and the run
destroys what it made at the end, also after a failure or Ctrl-C.

Measured per clone method: request to ready per desktop (p50 and p95), host memory
at ``count`` and at ``big`` desktops, and allocated disk bytes per desktop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.apply import ApplyResult, apply_plan
from orchestrator.errors import HostError, LabctlError, StorageError
from orchestrator.hosts.context import HostContext
from orchestrator.hosts.facts import KSM_DIR
from orchestrator.identity.keys import access_key_path
from orchestrator.instant import fork, parent
from orchestrator.inventory import load_inventory
from orchestrator.inventory.model import DEFAULT_HOST
from orchestrator.plan import Plan, make_plan, observed_desktops, open_inventory_host
from orchestrator.provision.remove import destroy_inventory
from orchestrator.provision.steps import EventSink

log = logging.getLogger(__name__)

# The pool keys of the bench inventory, which are also the clone methods compared.
METHODS = ("linked", "restore", "fork")

# The timings (seconds) whose sum is "request to ready". A child's "parent" timing is
# left out because it is the wait for the parent VM, whose build is reported on its own.
READY_STEPS = {
    "linked": ("storage", "define", "start", "boot_to_ready"),
    "restore": ("storage", "clone", "cloneprep", "nic", "verify", "ssh"),
    "fork": ("storage", "clone", "cloneprep", "nic", "verify", "ssh"),
}

DEFAULT_MEMORY = {"debian12": "512MiB", "tiny": "128MiB"}

# Targets of the run: both instant methods reach ready at least 20 times sooner than a
# cold boot (p50), and fork desktops take at most 30 % of the cold pool's memory.
TARGET_SPEEDUP = 20.0
TARGET_FORK_MEMORY_SHARE = 0.30

# Growing to ``big`` desktops must leave this much memory to the host, after each new
# desktop is counted at MEMORY_MARGIN times its pool's measured PSS per desktop.
MEMORY_MARGIN = 1.25
MEMORY_RESERVE = 1 << 30

PID_DIR = Path("/run/libvirt/qemu")


@dataclass
class MemorySample:
    """Host memory of one pool's running desktops at one pool size, in bytes."""

    desktops: int = 0
    pss_bytes: int = 0  # the sum of the desktops' QEMU processes' PSS
    ram_file_pss_bytes: int = 0  # the part of pss_bytes that maps the fork RAM file
    ram_file_bytes: int = 0  # allocated size of the fork parent's RAM file

    @property
    def total_bytes(self) -> int:
        """PSS with the fork RAM file counted once at its allocated size.

        The children's PSS of the RAM file is their share of the file pages they read, a
        part of the file itself, so adding the whole file to it would count that part twice.
        """
        return self.pss_bytes - self.ram_file_pss_bytes + self.ram_file_bytes


@dataclass
class MethodFigures:
    """Figures the bench measured for one clone method (one pool)."""

    method: str
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # by desktop
    memory: list[MemorySample] = field(default_factory=list)  # at count, then at big
    desktop_disk_bytes: int = 0  # the desktops' OS disks and seeds together
    parent_disk_bytes: int = 0  # the parent's disk and state file (instant clones)
    parent_build_seconds: float | None = None

    def ready_seconds(self) -> list[float]:
        return [request_to_ready(self.method, row) for row in self.timings.values()]

    def memory_at(self, desktops: int) -> MemorySample:
        for sample in self.memory:
            if sample.desktops == desktops:
                return sample
        raise LabctlError(f"no memory sample of pool {self.method} at {desktops} desktops")

    def disk_bytes_per_desktop(self) -> float:
        count = len(self.timings)
        return (self.desktop_disk_bytes + self.parent_disk_bytes) / count if count else 0.0


@dataclass
class InstantBenchResult:
    image: str
    memory: str
    count: int
    big: int
    accelerator: str = ""
    # /sys/kernel/mm/ksm/run at the start and at the last memory sample (0 stopped,
    # 1 running, "" absent). KSM is host-wide, so another apply can switch it meanwhile.
    ksm_run: tuple[str, str] = ("", "")
    ksm_pages_sharing: int = 0  # at the last memory sample
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute load at start and end
    methods: dict[str, MethodFigures] = field(default_factory=dict)
    wall_seconds: float = 0.0


@dataclass(frozen=True)
class Ratio:
    """A ratio of two measured figures and the target it must meet."""

    measure: str
    value: float
    target: float
    at_least: bool  # True if value >= target meets it, False if value <= target does
    percent: bool = False  # print as a percentage rather than as a factor

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.at_least else self.value <= self.target


# -- pure parts -----------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile (0 to 1) of ``values``.

    It interpolates linearly between the two closest ranks, like numpy's default method,
    so p50 of an even number of values is the mean of the middle two.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"percentile fraction {fraction} is outside 0 to 1")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def request_to_ready(method: str, timings: dict[str, float]) -> float:
    """Sum the provisioning steps of one desktop that lie between request and ready."""
    return sum(timings.get(step, 0.0) for step in READY_STEPS[method])


def _quotient(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.inf


def ratios(result: InstantBenchResult) -> list[Ratio]:
    """Compute the report's three ratios: two speed-ups and fork's share of cold memory."""
    p50 = {method: percentile(result.methods[method].ready_seconds(), 0.5)
           for method in METHODS}
    cold_memory = result.methods["linked"].memory_at(result.big).total_bytes
    fork_memory = result.methods["fork"].memory_at(result.big).total_bytes
    return [
        Ratio("cold p50 / restore p50", _quotient(p50["linked"], p50["restore"]),
              TARGET_SPEEDUP, at_least=True),
        Ratio("cold p50 / fork p50", _quotient(p50["linked"], p50["fork"]),
              TARGET_SPEEDUP, at_least=True),
        Ratio(f"fork memory / cold memory at {result.big}", _quotient(fork_memory, cold_memory),
              TARGET_FORK_MEMORY_SHARE, at_least=False, percent=True),
    ]


def ratio_row(ratio: Ratio) -> tuple[str, str, str]:
    """Return the table row (measure, value, target with met or missed) of a ratio."""
    verdict = "met" if ratio.met else "missed"
    sign = ">=" if ratio.at_least else "<="
    if ratio.percent:
        return (ratio.measure, f"{100 * ratio.value:.1f} %",
                f"{sign} {100 * ratio.target:g} % ({verdict})")
    return ratio.measure, f"{ratio.value:.1f}x", f"{sign} {ratio.target:g}x ({verdict})"


def growth_memory_bytes(samples: Iterable[MemorySample], big: int) -> int:
    """Estimate the memory (bytes) that growing every pool to ``big`` desktops needs.

    Each new desktop counts as MEMORY_MARGIN times its pool's PSS per desktop, without
    the fork RAM file, which the pool has already. MEMORY_RESERVE is added for the host.
    """
    need = 0.0
    for sample in samples:
        if sample.desktops == 0:
            continue
        per_desktop = (sample.pss_bytes - sample.ram_file_pss_bytes) / sample.desktops
        need += per_desktop * max(0, big - sample.desktops) * MEMORY_MARGIN
    return int(need) + MEMORY_RESERVE


def check_memory_for_growth(samples: Iterable[MemorySample], big: int, available: int) -> None:
    """Raise HostError if growing the pools to ``big`` would not fit in ``available`` bytes."""
    need = growth_memory_bytes(samples, big)
    if need > available:
        raise HostError(
            f"growing a bench pool to {big} desktops needs about {need / 2**30:.1f} GiB "
            f"more memory, but only {available / 2**30:.1f} GiB is available",
            where="/proc/meminfo MemAvailable",
            fix="use a smaller --big or --memory, or stop other guests first",
        )


def inventory_document(name: str, image: str, memory: str, size: int,
                       sizes: dict[str, int] | None = None) -> dict:
    """Build the bench inventory: three pools of ``size`` desktops on one user network.

    ``sizes`` overrides the size of single pools, e.g. ``{"fork": 20}``.
    """
    pools = {
        "linked": {"clone": "linked", "naming": f"{name}-l{{n}}"},
        "restore": {"clone": "instant", "instant": {"method": "restore"},
                    "naming": f"{name}-r{{n}}"},
        "fork": {"clone": "instant", "instant": {"method": "fork"},
                 "naming": f"{name}-f{{n}}"},
    }
    for method, pool in pools.items():
        pool["size"] = (sizes or {}).get(method, size)
    return {
        "name": name,
        "images": {image: {"build": image}},
        "networks": {"lab": {"mode": "user"}},
        "defaults": {"image": image, "network": "lab",
                     "hardware": {"vcpus": 1, "memory": memory}},
        "pools": pools,
    }


def summarize(result: InstantBenchResult) -> list[tuple[str, str, str]]:
    """Rows (measure, value, target) of the report."""
    rows = [
        ("image / accelerator", f"{result.image} / {result.accelerator}", ""),
        ("hardware per desktop", f"1 vCPU, {result.memory}, user network", ""),
        ("KSM", _ksm_text(result), ""),
        ("load average at start / end",
         f"{result.load_average[0]:.1f} / {result.load_average[1]:.1f}", ""),
    ]
    for method in METHODS:
        rows += _method_rows(result, result.methods[method])
    rows += [ratio_row(ratio) for ratio in ratios(result)]
    rows.append(("wall time of the run s", f"{result.wall_seconds:.0f}", ""))
    return rows


def _ksm_text(result: InstantBenchResult) -> str:
    names = {"0": "not running", "1": "running", "": "not available"}
    start, end = (names.get(value, f"run={value}") for value in result.ksm_run)
    text = start if start == end else f"{start} at the start, {end} at the end"
    if "1" in result.ksm_run:
        text += f" ({result.ksm_pages_sharing} pages sharing at the last sample)"
    return text


def _method_rows(result: InstantBenchResult,
                 figures: MethodFigures) -> list[tuple[str, str, str]]:
    method = figures.method
    ready = figures.ready_seconds()
    rows = [(f"{method}: request to ready p50 / p95 s ({len(ready)} desktops)",
             f"{percentile(ready, 0.5):.2f} / {percentile(ready, 0.95):.2f}", "")]
    if figures.parent_build_seconds is not None:
        rows.append((f"{method}: parent VM build s", f"{figures.parent_build_seconds:.1f}", ""))
    for desktops in sorted({result.count, result.big}):
        sample = figures.memory_at(desktops)
        rows.append((f"{method}: host memory at {desktops} desktops MiB",
                     f"{sample.total_bytes / 2**20:.0f} "
                     f"({sample.total_bytes / 2**20 / desktops:.0f} per desktop)", ""))
    rows.append((f"{method}: disk MiB per desktop", _disk_text(figures), ""))
    return rows


def _disk_text(figures: MethodFigures) -> str:
    count = len(figures.timings) or 1
    text = f"{figures.disk_bytes_per_desktop() / 2**20:.2f}"
    if figures.parent_disk_bytes:
        text += (f" ({figures.desktop_disk_bytes / count / 2**20:.2f} own + "
                 f"{figures.parent_disk_bytes / count / 2**20:.2f} parent share)")
    return text


def to_json(result: InstantBenchResult) -> dict:
    """Convert the result to JSON data: the report's rows, the ratios and every figure."""
    data = dataclasses.asdict(result)
    for method, figures in result.methods.items():
        data["methods"][method]["ready_seconds"] = figures.ready_seconds()
        for sample, sample_data in zip(figures.memory, data["methods"][method]["memory"]):
            sample_data["total_bytes"] = sample.total_bytes
    data["rows"] = [{"measure": m, "value": v, "target": t} for m, v, t in summarize(result)]
    data["ratios"] = [dict(dataclasses.asdict(r), met=r.met) for r in ratios(result)]
    return data


# -- measurements on the host -----------------------------------------------------------


def qemu_pss(domain_name: str) -> tuple[int, int]:
    """Return (PSS, PSS of shared memory) in bytes of a running domain's QEMU process.

    Both come from /proc/PID/smaps_rollup. For a fork child, the shared-memory part
    (Pss_Shmem) is its share of the parent's RAM file in /dev/shm.
    """
    pid_file = PID_DIR / f"{domain_name}.pid"
    try:
        pid = pid_file.read_text().strip()
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError as exc:
        raise HostError(f"reading the memory of domain {domain_name} failed: {exc}",
                        where=str(pid_file), fix="check that the domain is running") from exc
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines
              if line.startswith("Pss")}
    return fields.get("Pss", 0), fields.get("Pss_Shmem", 0)


def allocated_bytes(path: str) -> int:
    """Return the bytes a file takes on its filesystem (st_blocks * 512); 0 for no path."""
    if not path:
        return 0
    try:
        return os.stat(path).st_blocks * 512
    except OSError as exc:
        raise StorageError(f"reading the size of {path} failed: {exc.strerror}", where=path,
                           fix="check that the bench's volumes still exist") from exc


def available_memory() -> int:
    """Return MemAvailable of /proc/meminfo in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise HostError("/proc/meminfo has no MemAvailable line", where="/proc/meminfo",
                    fix="run the bench on Linux 3.14 or newer")


def _read_ksm(name: str) -> str:
    try:
        return (KSM_DIR / name).read_text().strip()
    except OSError:
        return ""


def measure_memory(ctx: HostContext, inventory: str) -> dict[str, MemorySample]:
    """Sum the QEMU processes' PSS of each pool's running desktops, all measured at once."""
    samples = {method: MemorySample() for method in METHODS}
    for name, (_domain, record) in sorted(observed_desktops(ctx, inventory).items()):
        sample = samples[record.pool]
        pss, shmem = qemu_pss(name)
        sample.desktops += 1
        sample.pss_bytes += pss
        if record.pool == "fork":
            sample.ram_file_pss_bytes += shmem
    for _domain, record in parent.inventory_parents(ctx.conn, inventory):
        if record.pool == "fork":
            samples["fork"].ram_file_bytes += allocated_bytes(record.ram_file)
    for method, sample in samples.items():
        log.info("pool %s: %d desktops take %d MiB (PSS %d MiB, RAM file %d MiB)", method,
                 sample.desktops, sample.total_bytes >> 20, sample.pss_bytes >> 20,
                 sample.ram_file_bytes >> 20)
    return samples


def measure_disks(ctx: HostContext, inventory: str, methods: dict[str, MethodFigures]) -> None:
    """Store the allocated bytes of each pool's desktop volumes and parent files.

    A pool normally has one parent VM. If its parent was rebuilt while older children
    still use the previous one, both count.
    """
    for _name, (_domain, record) in observed_desktops(ctx, inventory).items():
        figures = methods[record.pool]
        figures.desktop_disk_bytes += allocated_bytes(record.disk) + allocated_bytes(record.seed)
    for _domain, record in parent.inventory_parents(ctx.conn, inventory):
        figures = methods[record.pool]
        figures.parent_disk_bytes += (allocated_bytes(record.disk)
                                      + allocated_bytes(record.state_file))
        figures.parent_build_seconds = record.build_seconds


# -- the run ------------------------------------------------------------------------


def _quiet(_desktop: str, _step: str, _status: str) -> None:
    pass


def _check_arguments(image: str, count: int, big: int, memory: str | None) -> str:
    if count < 1:
        raise LabctlError(f"--count {count} is invalid", fix="give at least 1 desktop per pool")
    if big < count:
        raise LabctlError(f"--big {big} is smaller than --count {count}",
                          fix="give --big at least as large as --count")
    if memory:
        return memory
    if image not in DEFAULT_MEMORY:
        raise LabctlError(f"image {image} has no default guest memory for the bench",
                          fix=f"pass --memory, or use {' or '.join(DEFAULT_MEMORY)}")
    return DEFAULT_MEMORY[image]


def _write_inventory(path: Path, name: str, image: str, memory: str, size: int,
                     sizes: dict[str, int] | None = None) -> None:
    document = inventory_document(name, image, memory, size, sizes)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def _apply(path: Path, on_event: EventSink) -> tuple[ApplyResult, dict[str, str], str]:
    """Apply the inventory at ``path`` and return the result, each desktop's pool and
    the host's accelerator. Any failed desktop fails the bench."""
    inventory = load_inventory(path)
    plan = make_plan(inventory, build_images=True,
                     progress=lambda message: on_event("image", "build", message))
    try:
        _require_fork(plan)
        outcome = apply_plan(plan, on_event)
        pools = {action.desktop: action.pool for action in plan.actions}
        accelerator = plan.hosts[DEFAULT_HOST].accelerator
    finally:
        plan.close()
    if outcome.failed:
        desktop, error = next(iter(outcome.failed.items()))
        raise LabctlError(f"bench provisioning of {desktop} failed: {error}")
    return outcome, pools, accelerator


def _require_fork(plan: Plan) -> None:
    """Raise HostError if the fork pool would fall back to restore on this host."""
    for action in plan.actions:
        if action.pool == "fork" and action.request is not None \
                and action.request.instant != "fork":
            reason = fork.unavailable_reason(plan.hosts[action.host].conn)
            raise HostError(f"fork is not available on this host: {reason}",
                            where=action.host, fix="labctl host check shows what is missing")


def _store_timings(methods: dict[str, MethodFigures], outcome: ApplyResult,
                   pools: dict[str, str]) -> None:
    for desktop, timings in outcome.timings.items():
        methods[pools[desktop]].timings[desktop] = timings


def _store_memory(methods: dict[str, MethodFigures], samples: dict[str, MemorySample]) -> None:
    for method, sample in samples.items():
        methods[method].memory.append(sample)


def run_instant_bench(image: str = "debian12", count: int = 8, big: int = 20,
                      memory: str | None = None, on_event: EventSink = _quiet
                      ) -> InstantBenchResult:
    """Provision the three pools at ``count`` then at ``big`` desktops and measure them."""
    memory = _check_arguments(image, count, big, memory)
    started = time.monotonic()
    name = f"bench{secrets.token_hex(2)}"
    result = InstantBenchResult(image=image, memory=memory, count=count, big=big,
                                ksm_run=(_read_ksm("run"), ""))
    result.methods = {method: MethodFigures(method) for method in METHODS}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="labctl-bench-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        _write_inventory(path, name, image, memory, count)
        inventory = load_inventory(path)
        ctx = open_inventory_host(inventory, DEFAULT_HOST)
        try:
            _measure_both_sizes(result, ctx, path, name, on_event)
        finally:
            errors = destroy_inventory(ctx, name, on_event)
            ctx.close()
            shutil.rmtree(access_key_path(name).parent, ignore_errors=True)
        if errors:
            raise errors[0]
    result.load_average = (load_start, os.getloadavg()[0])
    result.wall_seconds = time.monotonic() - started
    return result


def _measure_one_grown(result: InstantBenchResult, ctx: HostContext, path: Path, name: str,
                       method: str, sample: MemorySample, on_event: EventSink) -> None:
    """Grow the pool of ``method`` to ``big``, measure it, and shrink it back to ``count``."""
    check_memory_for_growth([sample], result.big, available_memory())
    _write_inventory(path, name, result.image, result.memory, result.count,
                     {method: result.big})
    outcome, pools, _ = _apply(path, on_event)
    expected = result.big - result.count
    if len(outcome.created) != expected:
        raise LabctlError(f"growing pool {method} created {len(outcome.created)} desktops "
                          f"instead of {expected}: the bench figures would be wrong")
    _store_timings(result.methods, outcome, pools)
    result.methods[method].memory.append(measure_memory(ctx, name)[method])
    _write_inventory(path, name, result.image, result.memory, result.count)
    _apply(path, on_event)


def _measure_both_sizes(result: InstantBenchResult, ctx: HostContext, path: Path,
                        name: str, on_event: EventSink) -> None:
    outcome, pools, result.accelerator = _apply(path, on_event)
    _store_timings(result.methods, outcome, pools)
    samples = measure_memory(ctx, name)
    _store_memory(result.methods, samples)
    if result.big > result.count:
        for method in METHODS:
            _measure_one_grown(result, ctx, path, name, method, samples[method], on_event)
    measure_disks(ctx, name, result.methods)
    records = observed_desktops(ctx, name)
    if records:
        result.image = next(iter(records.values()))[1].image
    result.ksm_run = (result.ksm_run[0], _read_ksm("run"))
    result.ksm_pages_sharing = int(_read_ksm("pages_sharing") or 0)
