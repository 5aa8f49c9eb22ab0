"""labctl ssh DESKTOP: OpenSSH with labctl's key and the desktop's known host key."""

from __future__ import annotations

import argparse
import os
import signal
import shutil
from pathlib import Path

import libvirt

from orchestrator import paths
from orchestrator.errors import ConflictError, GuestError, HostError
from orchestrator.guest.ssh import known_hosts_name
from orchestrator.hosts.connection import DEFAULT_URI, connection
from orchestrator.identity import keys
from orchestrator.inventory import load_inventory
from orchestrator.instant.parent import ParentRecord
from orchestrator.state import metadata
from orchestrator.state.metadata import PARENT_NAMESPACE


def register(commands, add_output) -> None:
    ssh = commands.add_parser("ssh", help="open a shell on a desktop (host key verified)")
    ssh.add_argument("desktop", help="desktop (domain) name")
    ssh.add_argument("--inventory", "-i", type=Path,
                     help="inventory file, for the host's libvirt URI")
    ssh.add_argument("--uri", help=f"libvirt URI (default: the inventory's, else {DEFAULT_URI})")
    ssh.add_argument("--user", "-l", help="login user (default: the pool's first user)")
    ssh.epilog = "A command after -- runs instead of a shell, e.g.: labctl ssh lab-01 -- uname -a"
    ssh.set_defaults(handler=open_shell)


def _uri(args: argparse.Namespace) -> str:
    if args.uri:
        return args.uri
    if args.inventory:
        inventory = load_inventory(args.inventory)
        hosts = {pool.host for pool in inventory.pools.values()}
        if len(hosts) == 1:
            return inventory.hosts[hosts.pop()].uri
    return DEFAULT_URI


def open_shell(args: argparse.Namespace) -> int:
    uri = _uri(args)
    with connection(uri, read_only=True) as conn:
        try:
            domain = conn.lookupByName(args.desktop)
        except libvirt.libvirtError as exc:
            raise HostError(f"no desktop named {args.desktop}", where=uri,
                            fix="list them with 'labctl status INVENTORY'") from exc
        record = metadata.read(domain)
        is_parent = metadata.read(domain, ParentRecord, PARENT_NAMESPACE) is not None
    if record is None and is_parent:
        raise ConflictError(f"{args.desktop} is the parent VM of an instant pool; it has no "
                            "NIC and stays shut off", where=uri,
                            fix="log in to one of its children (labctl status INVENTORY)")
    if record is None:
        raise ConflictError(f"domain {args.desktop} was not created by labctl", where=uri)
    if not record.ssh_port:
        raise GuestError("this desktop has no SSH forward on 127.0.0.1 (network mode "
                         f"{record.extra.get('network_mode', '?')})", where=args.desktop,
                         fix="connect to the address its network gave it")
    key_path = keys.access_key_path(record.inventory)
    if not key_path.exists():
        raise GuestError(f"the access key of inventory {record.inventory} is not on this "
                         "machine", where=str(key_path),
                         fix="run labctl where the inventory was applied, or copy the key")
    ssh_binary = shutil.which("ssh")
    if ssh_binary is None:
        raise GuestError("the ssh client is not installed", fix="apt-get install openssh-client")
    known_hosts = _known_hosts_file(args.desktop, record.ssh_port,
                                     record.extra.get("ssh_host_key", ""))
    user = args.user or record.extra.get("login_user") or "root"
    argv = [
        ssh_binary, "-i", str(key_path), "-p", str(record.ssh_port),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes",
        f"{user}@127.0.0.1", *args.remote_command,
    ]
    # ssh should get the default SIGPIPE action a shell would give it; Python ignores it.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.execv(ssh_binary, argv)
    return 0  # not reached


def _known_hosts_file(desktop: str, port: int, host_key: str) -> str:
    """Write a known_hosts file holding only the desktop's key labctl generated."""
    if not host_key:
        raise GuestError("the desktop's host key is not recorded", fix="re-create the desktop")
    directory = paths.ensure_private_dir(paths.state_dir() / "known_hosts")
    path = directory / f"{desktop}.known"
    path.write_text(f"{known_hosts_name('127.0.0.1', port)} {host_key}\n")
    return str(path)
