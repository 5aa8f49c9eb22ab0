"""labctl bench: provisioning cost of linked and full clones, measured in one run.

Everything runs through the same code as ``labctl apply`` on a throw-away inventory
written to a temporary directory, and is destroyed at the end. Besides labctl's own
figures it times ``virt-clone`` making the same full clone, and plans 1,000 desktops
against libvirt's test driver.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import yaml

from orchestrator.apply import apply_plan
from orchestrator.domain import Disk, DomainSpec, render_domain
from orchestrator.errors import LabctlError
from orchestrator.hosts.context import HostContext
from orchestrator.identity.desktop import new_uuid
from orchestrator.identity.keys import access_key_path
from orchestrator.inventory import load_inventory
from orchestrator.plan import make_plan, observed_desktops
from orchestrator.provision.remove import destroy_inventory
from orchestrator.storage import pool as volumes
from orchestrator.storage import replica


@dataclass
class BenchResult:
    image: str
    accelerator: str
    count: int
    linked: list[dict[str, float]] = field(default_factory=list)
    full: list[dict[str, float]] = field(default_factory=list)
    virt_clone_seconds: float | None = None
    virt_clone_note: str = ""
    plan_1000_seconds: float = 0.0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0


def _quiet(_desktop: str, _step: str, _status: str) -> None:
    pass


def _inventory(directory: Path, name: str, image: str, count: int, memory: str) -> Path:
    document = {
        "name": name,
        "images": {image: {"build": image}},
        "networks": {"lab": {"mode": "user"}},
        "defaults": {"image": image, "network": "lab", "hardware": {"memory": memory}},
        "pools": {
            "linked": {"clone": "linked", "size": count, "naming": f"{name}-l{{n}}"},
            "full": {"clone": "full", "size": 1, "naming": f"{name}-f{{n}}"},
        },
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_bench(image: str = "tiny", count: int = 4, memory: str = "128MiB",
              on_event=_quiet) -> BenchResult:
    """Provision ``count`` linked clones and one full clone of ``image`` and measure them."""
    wall_start, cpu_start = time.monotonic(), time.process_time()
    name = f"bench{secrets.token_hex(2)}"
    with tempfile.TemporaryDirectory(prefix="labctl-bench-") as tmp:
        inventory = load_inventory(_inventory(Path(tmp), name, image, count, memory))
        plan = make_plan(inventory, build_images=True)
        try:
            outcome = apply_plan(plan, on_event)
            if outcome.failed:
                first = next(iter(outcome.failed.values()))
                raise LabctlError(f"bench provisioning failed: {first}")
            ctx = plan.hosts["local"]
            records = observed_desktops(ctx, name)
            result = BenchResult(image=records and next(iter(records.values()))[1].image or image,
                                 accelerator=ctx.accelerator, count=count)
            for desktop, timings in sorted(outcome.timings.items()):
                target = result.full if desktop.startswith(f"{name}-f") else result.linked
                target.append(timings)
            seconds, note = _time_virt_clone(ctx, name)
            result.virt_clone_seconds, result.virt_clone_note = seconds, note
        finally:
            _destroy(plan, name)
            plan.close()
            shutil.rmtree(access_key_path(name).parent, ignore_errors=True)
    result.plan_1000_seconds = time_plan_1000()
    result.wall_seconds = time.monotonic() - wall_start
    result.cpu_seconds = time.process_time() - cpu_start
    return result


def _destroy(plan, name: str) -> None:
    for ctx in plan.hosts.values():
        destroy_inventory(ctx, name, _quiet)


def _time_virt_clone(ctx: HostContext, name: str) -> tuple[float | None, str]:
    """Time virt-clone copying a shut-off domain whose disk is a standalone copy of the image."""
    binary = shutil.which("virt-clone")
    if binary is None:
        return None, "virt-clone is not installed (Debian package virtinst)"
    source = f"{name}-vcsrc"
    target = f"{name}-vc"
    pool = ctx.pool
    marker = next(v for v in pool.listAllVolumes(0)
                  if v.name().startswith(replica.PREFIX) and v.name().endswith(".qcow2"))
    src_volume = volumes.clone_volume(pool, f"{source}.qcow2", marker, marker.info()[1])
    spec = DomainSpec(name=source, uuid=new_uuid(),
                      domain_type=ctx.domain_type, memory_kib=131072, vcpus=1,
                      disks=(Disk(src_volume.path(), "qcow2", "vda"),), metadata_xml="",
                      emulator=ctx.emulator)
    domain = ctx.conn.defineXML(render_domain(spec))
    target_path = os.path.join(volumes.pool_path(pool), f"{target}.qcow2")
    try:
        started = time.monotonic()
        subprocess.run([binary, "--connect", ctx.settings.uri, "--original", source,
                        "--name", target, "--file", target_path, "--check", "all=off"],
                       check=True, capture_output=True, text=True)
        return time.monotonic() - started, "virt-clone --original (qemu-img convert of the disk)"
    except subprocess.CalledProcessError as exc:
        return None, f"virt-clone failed: {exc.stderr.strip().splitlines()[-1:]}"
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            ctx.conn.lookupByName(target).undefine()
        domain.undefine()
        pool.refresh(0)
        for volume_name in (f"{source}.qcow2", f"{target}.qcow2"):
            volumes.delete(pool, volume_name)


def time_plan_1000() -> float:
    """Seconds to load and plan an inventory of 1,000 desktops on libvirt's test driver."""
    with tempfile.TemporaryDirectory(prefix="labctl-bench-plan-") as tmp:
        document = {
            "name": "bench-plan",
            "hosts": {"test": {"uri": "test:///default"}},
            "images": {"tiny": {"build": "tiny"}},
            "networks": {"lab": {"mode": "user"}},
            "pools": {"big": {"image": "tiny", "clone": "linked", "size": 1000,
                              "naming": "plan-{n}", "host": "test", "network": "lab"}},
        }
        path = Path(tmp) / "plan.yaml"
        path.write_text(yaml.safe_dump(document))
        started = time.monotonic()
        plan = make_plan(load_inventory(path))
        elapsed = time.monotonic() - started
        actions = len(plan.of_kind("create"))
        plan.close()
    if actions != 1000:
        raise LabctlError(f"the 1,000-desktop plan had {actions} create actions")
    return elapsed


def summarize(result: BenchResult) -> list[tuple[str, str, str]]:
    """Rows (measure, value, target) for the report."""
    def median(rows: list[dict[str, float]], *keys: str) -> float:
        values = [sum(row.get(key, 0.0) for key in keys) for row in rows]
        return statistics.median(values) if values else 0.0

    linked_sdc = median(result.linked, "storage", "define", "start")
    linked_disk = median(result.linked, "disk_bytes") / (1 << 20)
    full_disk = median(result.full, "disk_bytes") / (1 << 20)
    cpu_share = 100 * result.cpu_seconds / result.wall_seconds if result.wall_seconds else 0
    rows = [
        ("image / accelerator", f"{result.image} / {result.accelerator}", ""),
        ("linked: storage s (median)", f"{median(result.linked, 'storage'):.3f}", ""),
        ("linked: define+start s (median)", f"{median(result.linked, 'define', 'start'):.3f}", ""),
        ("linked: storage+define+start s", f"{linked_sdc:.3f}", "<= 0.5"),
        ("linked: boot to ready s (median)", f"{median(result.linked, 'boot_to_ready'):.1f}", ""),
        ("linked: new disk MiB per desktop", f"{linked_disk:.2f}", "<= 1"),
        ("full: storage s", f"{median(result.full, 'storage'):.3f}", ""),
        ("full: new disk MiB", f"{full_disk:.1f}", ""),
        ("virt-clone of the same full clone s",
         f"{result.virt_clone_seconds:.3f}" if result.virt_clone_seconds else "n/a",
         result.virt_clone_note),
        ("labctl CPU / wall", f"{result.cpu_seconds:.1f} s / {result.wall_seconds:.1f} s = "
                              f"{cpu_share:.1f} %", "<= 5 %"),
        ("plan 1,000 desktops (test driver) s", f"{result.plan_1000_seconds:.3f}", "<= 1"),
    ]
    return rows
