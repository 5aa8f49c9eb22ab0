"""labctl host check."""

from __future__ import annotations

import argparse

from orchestrator import output
from orchestrator.hosts import facts
from orchestrator.hosts.connection import DEFAULT_URI, connection
from orchestrator.hosts.context import HostSettings


def register(commands, add_output) -> None:
    host = commands.add_parser("host", help="inspect libvirt hosts")
    sub = host.add_subparsers(dest="host_command", metavar="COMMAND", required=True)
    check = sub.add_parser(
        "check", help="print libvirt and QEMU versions, the accelerator (probed), storage, KSM"
    )
    check.add_argument("--uri", default=DEFAULT_URI, type=_uri, help=f"libvirt URI (default {DEFAULT_URI})")
    check.add_argument("--storage-pool", default=HostSettings.storage_pool,
                       help="storage pool to report on (default %(default)s)")
    check.add_argument("--storage-path", default=HostSettings.storage_path,
                       help="its directory if it does not exist yet (default %(default)s)")
    add_output(check)
    check.set_defaults(handler=check_host)


def check_host(args: argparse.Namespace) -> int:
    with connection(args.uri) as conn:
        found = facts.gather(conn, args.uri, storage_pool=args.storage_pool,
                             storage_path=args.storage_path)
    if args.output == "json":
        output.print_json(found.to_json())
        return 0
    rows = [
        ("URI", found.uri),
        ("host name", found.hostname),
        ("libvirt", found.libvirt_version),
        ("QEMU", found.qemu_version),
        ("accelerator", f"{found.accelerator} ({found.accelerator_reason})"),
        ("domain type", found.domain_type),
        ("libvirt domain types", ", ".join(found.libvirt_domain_types)),
        ("CPUs", found.cpus),
        ("memory", f"{output.human_bytes(found.memory_bytes)} "
                   f"({output.human_bytes(found.free_memory_bytes)} free)"),
        ("storage", f"pool {found.storage_pool} at {found.storage_path}, "
                    f"{output.human_bytes(found.storage_free_bytes)} free"),
        ("KSM", ("available" if found.ksm_available else "not available")
                + (", running" if found.ksm_running else "")),
    ]
    output.print_table(None, ("fact", "value"), rows)
    return 0


def _uri(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the libvirt URI is empty")
    return text
