"""labctl plan | apply | status | refresh | destroy | smoke."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import libvirt

from orchestrator import bench_instant, locks, output, recovery
from orchestrator import status as status_module
from orchestrator.apply import ApplyResult, apply_plan, refresh_desktops
from orchestrator.bench import run_bench, summarize
from orchestrator.errors import LabctlError
from orchestrator.hosts.connection import RECONNECT_FIX, libvirt_failure, lost_libvirtd
from orchestrator.hosts.context import HostSettings
from orchestrator.images import recipes
from orchestrator.inventory import load_inventory
from orchestrator.inventory.model import MIN_MEMORY
from orchestrator.plan import Plan, make_plan, open_inventory_host
from orchestrator.provision.remove import destroy_inventory
from orchestrator.smoke import run_smoke as smoke
from orchestrator.state import metadata
from orchestrator.state.recorder import EventRecorder

_SYMBOLS = {"create": "+", "delete": "-", "update": "~", "start": ">", "replace": "!",
            "refresh": "*", "outdated": "?", "keep": "="}


def register(commands, add_output) -> None:
    plan = commands.add_parser("plan", help="list what apply would create, change or remove")
    plan.add_argument("inventory", type=Path)
    add_output(plan)
    plan.set_defaults(handler=show_plan)

    apply = commands.add_parser("apply", help="converge the hosts to the inventory")
    apply.add_argument("inventory", type=Path)
    apply.add_argument("--replace", action="store_true",
                       help="re-create desktops whose image or identity settings changed "
                       "(their disk contents are lost)")
    add_output(apply)
    apply.set_defaults(handler=run_apply)

    status = commands.add_parser("status", help="print the inventory's desktops")
    status.add_argument("inventory", type=Path)
    add_output(status)
    status.set_defaults(handler=show_status)

    destroy = commands.add_parser("destroy", help="remove everything labctl created for the "
                                  "inventory")
    destroy.add_argument("inventory", type=Path)
    add_output(destroy)
    destroy.set_defaults(handler=run_destroy)

    refresh = commands.add_parser(
        "refresh", help="re-create desktops from their image, keeping name, UUID and MAC "
        "(instant clones are re-forked from the parent)")
    refresh.add_argument("inventory", type=Path)
    refresh.add_argument("desktops", nargs="+", metavar="DESKTOP")
    add_output(refresh)
    refresh.set_defaults(handler=run_refresh)

    smoke = commands.add_parser("smoke", help="boot one throw-away linked clone of an image, "
                                "read its identity back, remove it")
    smoke.add_argument("image", nargs="?", default="tiny",
                       help="catalog image or recipe name (default tiny)")
    smoke.add_argument("--uri", default=HostSettings.uri, help="libvirt URI")
    smoke.add_argument("--memory", type=_memory_mib, default=512,
                       help=f"guest memory in MiB ({MIN_SMOKE_MIB} to {MAX_SMOKE_MIB})")
    add_output(smoke)
    smoke.set_defaults(handler=run_smoke)


# labctl smoke --memory, in MiB: the inventory's minimum, up to 1 TiB.
MIN_SMOKE_MIB = MIN_MEMORY >> 20
MAX_SMOKE_MIB = 1 << 20


def _memory_mib(text: str) -> int:
    """Parse --memory before anything is built or booted."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number of MiB: {text!r} (give a whole number such as 512)") from None
    if not MIN_SMOKE_MIB <= value <= MAX_SMOKE_MIB:
        raise argparse.ArgumentTypeError(
            f"{value} MiB is outside {MIN_SMOKE_MIB} to {MAX_SMOKE_MIB} MiB (use 512 for the "
            "tiny image, 1024 or more for debian12)")
    return value


def _describe_plan(plan: Plan) -> list[dict]:
    return [{"action": action.kind, "desktop": action.desktop, "pool": action.pool,
             "host": action.host, "reason": action.reason} for action in plan.actions]


def show_plan(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    plan = make_plan(inventory)
    try:
        if args.output == "json":
            output.print_json({"inventory": inventory.name, "build_images": plan.images_to_build,
                               "build_parents": plan.parents_to_build,
                               "actions": _describe_plan(plan),
                               "held": {key: layout.held for key, layout in
                                        plan.layouts.items() if layout.held}})
            return 0
        for key in plan.images_to_build:
            ref = inventory.images[key]
            if ref.build:
                print(f"  build image {ref.build} (not in the catalog yet)")
            elif ref.path:
                print(f"  import image {key} from {ref.path}")
        for pool, method in sorted(plan.parents_to_build.items()):
            print(f"  build parent VM of instant pool {pool} ({method})")
        for action in plan.actions:
            print(f"{_SYMBOLS[action.kind]} {action.kind:<8} {action.desktop:<16} "
                  f"pool {action.pool:<12} {action.reason}")
        counts = {kind: len(plan.of_kind(kind)) for kind in _SYMBOLS}
        print(f"Plan: {counts['create']} to create, {counts['update']} to update, "
              f"{counts['start']} to start, "
              f"{counts['replace'] + counts['outdated']} to replace, {counts['refresh']} to "
              f"refresh, {counts['delete']} to delete, {counts['keep']} unchanged.")
        _print_held(plan)
    finally:
        plan.close()
    return 0


def _print_held(plan: Plan) -> None:
    for key, layout in sorted(plan.layouts.items()):
        if layout.held:
            print(f"pool {key} gets no new desktops: {layout.held}")


def _inventory_lock(inventory, command: str):
    """Hold the inventory's run lock: one apply, refresh or destroy of it at a time on this
    machine. A second one exits at once and names the first, instead of waiting, because
    an apply queued behind another apply of the same file would find nothing left to do,
    and a silent wait would hide a run that hangs."""
    return locks.exclusive_run(f"inventory:{inventory.name}",
                               f"{command} of inventory {inventory.name}")


def run_apply(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    with _inventory_lock(inventory, "apply"):
        return _apply(args, inventory)


def _apply(args: argparse.Namespace, inventory) -> int:
    printer = output.EventPrinter(json_lines=args.output == "json")
    # What a killed run of this inventory left goes first, so the plan sees the host
    # as the interrupted run would have left it after a clean rollback.
    recovery.recover_inventory(inventory.name, printer)
    plan = make_plan(inventory, build_images=True,
                     progress=lambda message: printer("image", "build", message))
    try:
        if not plan.changes:
            _say(args, "Nothing to change: every desktop is up to date.")
        result = apply_plan(plan, printer, replace=args.replace)
        try:
            data = status_module.collect(inventory, plan.hosts)
        except libvirt.libvirtError as exc:
            # The desktops' own errors below are more specific, so print them all.
            data = None
            result.failed["status"] = libvirt_failure("reading the desktops' status failed",
                                                      exc)
    finally:
        plan.close()
    if args.output == "json":
        failed = {name: str(error) for name, error in result.failed.items()}
        sys.stdout.write(json.dumps({"event": "result", "created": result.created,
                                            "updated": result.updated,
                                            "deleted": result.deleted,
                                            "skipped": result.skipped,
                                            "held": result.held,
                                            "unreached": result.unreached,
                                            "failed": failed,
                                            "timings": result.timings}) + "\n")
    elif data is not None:
        _print_status(data)
        _print_parents(data)
        _print_stopped(args.inventory, data)
        for name in result.skipped:
            print(f"{name}: out of date (image or identity changed); run 'labctl apply "
                  f"--replace {args.inventory}' to re-create it")
        _print_access(args.inventory, data)
    _print_failed(result)
    if result.held:
        print(f"labctl: not made because their pool stopped: {', '.join(sorted(result.held))}",
              file=sys.stderr)
    return 1 if result.failed or result.unreached else 0


def _print_failed(result: ApplyResult) -> None:
    """Print one line per failed desktop; the fix for a lost libvirtd only once, last."""
    lost = False
    for error in result.failed.values():
        if lost_libvirtd(error):
            lost = True
            if error.fix == RECONNECT_FIX:
                error = LabctlError(error.message, where=error.where)
        print(f"labctl: error: {error}", file=sys.stderr)
    if result.unreached:
        print("labctl: not tried because the connection to libvirtd broke: "
              f"{', '.join(sorted(result.unreached))}", file=sys.stderr)
    if lost or result.unreached:
        print(f"labctl: error: {RECONNECT_FIX}", file=sys.stderr)


def _say(args: argparse.Namespace, text: str) -> None:
    if args.output != "json":
        print(text)


def _print_status(data: dict) -> None:
    rows = []
    for pool in data["pools"]:
        for desktop in pool["desktops"]:
            ssh = desktop["ssh"]
            session = desktop["session"] or {"user": "", "since": ""}
            snapshot = desktop.get("snapshot")
            rows.append((
                desktop["name"], pool["name"], desktop["clone"], desktop["state"],
                desktop["mac"], desktop["hostname"], desktop["machine_id"][:12],
                f"127.0.0.1:{ssh['port']}" if ssh else "", f"{desktop['ready_seconds']:.1f}",
                desktop["assigned_to"], session["user"], session["since"],
                _age(snapshot["age_seconds"]) if snapshot else "",
            ))
    output.print_table(f"inventory {data['inventory']}",
                       ("desktop", "pool", "clone", "state", "MAC", "hostname", "machine-id",
                        "SSH", "ready s", "assigned", "session", "since", "snapshot age"),
                       rows)


def _print_stopped(path: Path, data: dict) -> None:
    """Print each pool stopped at a provisioning error, with the error and its time."""
    for pool in data["pools"]:
        error = pool.get("error")
        if error:
            print(f"pool {pool['name']} stopped at {error['time']}: {error['desktop']}: "
                  f"{error['message']} (fix the cause, then labctl clear {path} "
                  f"{pool['name']})")


def _print_parents(data: dict) -> None:
    rows = [(p["name"], p["pool"], p["method"], p["state"], p["image"],
             f"{p['state_bytes'] / 2**20:.1f} MiB",
             f"{p['ram_bytes'] / 2**20:.0f} MiB" if p["ram_file"] else "",
             _age(p["age_seconds"])) for p in data.get("parents", [])]
    if rows:
        output.print_table("parent VMs of instant clones",
                           ("parent", "pool", "method", "state", "image", "saved state",
                            "RAM file", "age"), rows)


def _age(seconds: int) -> str:
    if seconds < 0:
        return "?"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _print_access(path: Path, data: dict) -> None:
    names = [d["name"] for pool in data["pools"] for d in pool["desktops"]]
    if not names:
        return
    print(f"Log in:   labctl ssh {names[0]} --inventory {path}")
    print(f"Destroy:  labctl destroy {path}")


def show_status(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    hosts = {key: open_inventory_host(inventory, key) for key in
             sorted({pool.host for pool in inventory.pools.values()})}
    try:
        data = status_module.collect(inventory, hosts)
    finally:
        for ctx in hosts.values():
            ctx.close()
    if args.output == "json":
        output.print_json(data)
    else:
        _print_status(data)
        _print_parents(data)
        _print_stopped(args.inventory, data)
    return 0


def run_refresh(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    with _inventory_lock(inventory, "refresh"):
        printer = output.EventPrinter(json_lines=args.output == "json")
        recovery.recover_inventory(inventory.name, printer)
        plan = make_plan(inventory)
        try:
            result = refresh_desktops(plan, args.desktops, printer)
        finally:
            plan.close()
    _print_failed(result)
    return 1 if result.failed or result.unreached else 0


def run_destroy(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    with _inventory_lock(inventory, "destroy"):
        return _destroy(args, inventory)


def _destroy(args: argparse.Namespace, inventory) -> int:
    printer = output.EventPrinter(json_lines=args.output == "json")
    hosts_used = sorted({pool.host for pool in inventory.pools.values()} | set(inventory.hosts))
    errors = []
    recovery.recover_inventory(inventory.name, printer)
    for key in hosts_used:
        ctx = open_inventory_host(inventory, key)
        try:
            desktops = metadata.inventory_desktops(ctx.conn, inventory.name)
            recorder = EventRecorder(inventory.name, printer, {
                name: (record.pool, "delete") for name, (_domain, record) in desktops.items()})
            errors += destroy_inventory(ctx, inventory.name, recorder)
        finally:
            ctx.close()
    for error in errors:
        print(f"labctl: error: {error}", file=sys.stderr)
    return 1 if errors else 0


def run_smoke(args: argparse.Namespace) -> int:
    printer = output.EventPrinter(json_lines=args.output == "json")
    image = recipes.ensure(args.image, progress=lambda m: printer("image", "build", m))
    result = smoke(image, HostSettings(uri=args.uri), printer, memory_bytes=args.memory << 20)
    if args.output == "json":
        # One line, like the event lines before it, so scripts read the output line by line.
        sys.stdout.write(json.dumps({"event": "result", "image": image.ref,
                                     "desktop": result.name, "hostname": result.hostname,
                                     "machine_id": result.machine_id,
                                     "accelerator": result.accelerator,
                                     "timings": result.timings}) + "\n")
        return 0
    print(f"image        {image.ref}")
    print(f"accelerator  {result.accelerator}")
    print(f"hostname     {result.hostname}")
    print(f"machine-id   {result.machine_id}")
    for key, value in result.timings.items():
        print(f"{key + ' s':<12} {value:.2f}")
    print("removed      domain, overlay, seed and unused replica")
    return 0


def register_bench(commands, add_output) -> None:
    bench = commands.add_parser(
        "bench", help="measure provisioning of linked and full clones (and virt-clone) in one "
        "run; with --instant, cold linked clones against instant clones"
    )
    bench.add_argument("--instant", action="store_true",
                       help="compare a cold-booted linked pool with instant pools made by "
                       "restore and by fork: request to ready, host memory, disk")
    bench.add_argument("--image", default=None,
                       help="recipe to clone (default tiny; debian12 with --instant)")
    bench.add_argument("--count", type=int, default=None,
                       help="linked clones (default 4); with --instant, desktops per pool "
                       "before growing (default 8)")
    bench.add_argument("--big", type=int, default=None,
                       help="with --instant: desktops per pool after growing (default 20)")
    bench.add_argument("--memory", default=None,
                       help="guest memory (default 128MiB; with --instant 512MiB for debian12 "
                       "and 128MiB for tiny)")
    add_output(bench)
    bench.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    on_event = output.EventPrinter() if args.output != "json" else _silent
    if args.instant:
        figures = bench_instant.run_instant_bench(
            args.image or "debian12", 8 if args.count is None else args.count,
            20 if args.big is None else args.big, args.memory, on_event=on_event)
        if args.output == "json":
            output.print_json(bench_instant.to_json(figures))
        else:
            output.print_table("labctl bench --instant", ("measure", "value", "target"),
                               bench_instant.summarize(figures))
        return 0
    if args.big is not None:
        raise LabctlError("--big applies only with --instant", fix="add --instant or drop --big")
    result = run_bench(args.image or "tiny", 4 if args.count is None else args.count,
                       args.memory or "128MiB", on_event=on_event)
    rows = summarize(result)
    if args.output == "json":
        output.print_json({"rows": [{"measure": m, "value": v, "target": t} for m, v, t in rows],
                           "linked": result.linked, "full": result.full})
    else:
        output.print_table("labctl bench", ("measure", "value", "target"), rows)
    return 0


def _silent(_desktop: str, _step: str, _status: str) -> None:
    pass
