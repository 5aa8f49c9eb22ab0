"""The crash matrix's parts: operations, their steps, one crash run, and the orphan scan.

A case kills labctl (LABCTL_CRASH_AFTER, SIGKILL) right after one step of one
operation, then runs `labctl apply` and checks that the inventory converged. Nothing
else may be left: no domain, volume, state file (save image), RAM file, FIFO or open
journal operation beyond those of the inventory's desktops and usable parent VMs.
The orphan scan reads libvirt, the storage pools' directories, the RAM directory and
the FIFO directory; it derives parent names from the inventory, never from the journal.
A lab with a second storage pool (rebalance) also counts a desktop's disk in the
directory its domain does not use, and a replica there that no desktop needs, as
orphans. A lab with its own image versions (recompose) counts a replica of a version
its desktop is not on as an orphan.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from dataclasses import dataclass, field
from pathlib import Path

import xml.etree.ElementTree as ET

import libvirt
import yaml
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl

from orchestrator import journal, plan
from orchestrator.errors import HostError
from orchestrator.hosts.connection import open_connection
from orchestrator.instant import fork, parent
from orchestrator.instant.child import FIFO_DIR
from orchestrator.inventory import load_inventory
from orchestrator.state import metadata

COMMAND_TIMEOUT = 900
KILLED = -9  # subprocess's return code of a process that SIGKILL ended
# Messages of a libvirtd restart, which other tests on the machine may cause. The command
# then runs again after RETRY_PAUSE seconds, at most RETRIES times, and counts a retry.
RESTART_MESSAGES = ("cannot connect to libvirt", "Cannot recv data", "client socket is closed",
                    "connection closed", "End of file while reading data", "Broken pipe")
RETRIES = 5
RETRY_PAUSE = 10.0
T = TypeVar("T")

DESKTOP_STEPS = ("check", "identity", "os-disk", "seed", "define", "start", "ready", "record")
# A full clone takes its post-customization snapshot once it is ready.
FULL_STEPS = (*DESKTOP_STEPS[:-1], "snapshot", "record")
# A full clone's refresh from that snapshot.
REVERT_STEPS = ("claim", "stop", "revert", "start", "ready", "record")
CHILD_STEPS = ("check", "parent", "identity", "os-disk", "seed", "clone", "cloneprep", "nic",
               "verify", "persist", "ready", "record")
PARENT_STEPS = ("check", "identity", "os-disk", "seed", "define", "start", "ready", "prepare",
                "save", "freeze", "record")
MOVE_STEPS = ("space", "shutdown", "copy", "verify", "redefine", "start", "remove-old")
REFRESH_STEPS = ("remove-old", *DESKTOP_STEPS, "provision")


@dataclass(frozen=True)
class Operation:
    """One operation of the matrix: its pool, the steps to crash after, and their subset
    run in CI (the whole matrix is scripts/crash-matrix)."""

    name: str
    clone: str
    method: str = ""
    steps: tuple[str, ...] = ()
    ci_steps: tuple[str, ...] = ()
    # "apply" provisions; "refresh" re-creates an existing desktop; "rebalance" moves its
    # disk to the other storage pool; "recompose" re-creates it on the other image version.
    command: str = "apply"
    # The command run after the killed one, which must converge.
    then: str = "apply"
    # A parent build crashes in the parent VM, which each case builds anew.
    in_parent: bool = False
    # A deletion crashes while apply removes the previous case's desktop.
    in_previous: bool = False


OPERATIONS = (
    Operation("linked", "linked", steps=DESKTOP_STEPS, ci_steps=("os-disk",)),
    Operation("full", "full", steps=FULL_STEPS, ci_steps=("define",)),
    Operation("fork-child", "instant", "fork", CHILD_STEPS, ("persist",)),
    Operation("restore-child", "instant", "restore", CHILD_STEPS, ("clone",)),
    Operation("fork-parent", "instant", "fork", PARENT_STEPS, ("save",), in_parent=True),
    Operation("restore-parent", "instant", "restore", PARENT_STEPS, ("start",),
              in_parent=True),
    Operation("refresh-linked", "linked", steps=REFRESH_STEPS,
              ci_steps=("remove-old",), command="refresh"),
    Operation("refresh-full", "full", steps=REVERT_STEPS, ci_steps=("revert",),
              command="refresh"),
    Operation("refresh-fork", "instant", "fork", ("remove-old", *CHILD_STEPS, "provision"),
              ci_steps=("clone",), command="refresh"),
    Operation("rebalance", "linked", steps=MOVE_STEPS, ci_steps=("redefine",),
              command="rebalance"),
    Operation("rebalance-again", "linked", steps=MOVE_STEPS, ci_steps=("start",),
              command="rebalance", then="rebalance"),
    Operation("recompose", "linked", steps=REFRESH_STEPS, ci_steps=("define",),
              command="recompose"),
    Operation("delete", "linked", steps=("undefine", "volumes"), ci_steps=("undefine",),
              in_previous=True),
)


def selected_steps(operation: Operation) -> tuple[str, ...]:
    """All steps with LABCTL_CRASH_MATRIX=full, else the CI subset."""
    return operation.steps if os.environ.get("LABCTL_CRASH_MATRIX") == "full" else (
        operation.ci_steps)


@dataclass
class CaseResult:
    operation: str
    step: str
    killed: bool
    converged: bool
    orphans: list[str]
    problems: list[str]
    seconds: float
    # Commands run again after a libvirtd restart (not labctl's failure).
    retries: int = 0

    @property
    def passed(self) -> bool:
        return self.killed and self.converged and not self.orphans and not self.problems


@dataclass
class Lab:
    """One inventory file of the matrix, rewritten for each case under the same name."""

    path: Path
    name: str
    prefix: str
    parent_keys: set[str] = field(default_factory=set)
    retries: int = 0
    # Storage pools besides the test pool (name: directory) that the lab made.
    storage: dict[str, str] = field(default_factory=dict)
    # Image versions of the lab's own catalog entry (ref: ImageVersion), and the ref its
    # desktop must be on.
    versions: dict = field(default_factory=dict)
    expected_image: str = ""
    images: dict = field(default_factory=lambda: {"tiny": {"build": "tiny"}})

    def write(self, pools: dict) -> None:
        host = {"uri": URI, "limits": {"provisioning": 1},
                "storage": {"pool": TEST_POOL, "path": TEST_POOL_PATH}}
        if self.storage:
            host["storage_pools"] = [{"pool": name, "path": path}
                                     for name, path in self.storage.items()]
        document = {
            "name": self.name,
            "hosts": {"local": host},
            "images": self.images,
            "networks": {"lab": {"mode": "user"}},
            "pools": pools,
        }
        self.path.write_text(yaml.safe_dump(document, sort_keys=False))
        self.parent_keys |= retrying(lambda: inventory_parent_keys(self.path))

    def labctl(self, *args: str, crash: str = "") -> subprocess.CompletedProcess:
        """Run labctl on this lab, again after a libvirtd restart (counted in retries)."""
        env = {journal.CRASH_VARIABLE: crash} if crash else {}
        for _attempt in range(RETRIES):
            result = run_labctl(*args, timeout=COMMAND_TIMEOUT, env=env)
            if result.returncode in (0, KILLED) or not restarted(result):
                return result
            self.retries += 1
            time.sleep(RETRY_PAUSE)
        return result


def restarted(result: subprocess.CompletedProcess) -> bool:
    return any(message in result.stderr for message in RESTART_MESSAGES)


@contextlib.contextmanager
def connection() -> Iterator[libvirt.virConnect]:
    """A new connection per check: a libvirtd restart closes older ones."""
    conn = retrying(lambda: open_connection(URI))
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def retrying(work: Callable[[], T]) -> T:
    """Return ``work()``, called again while libvirtd restarts (at most RETRIES times)."""
    for _attempt in range(RETRIES - 1):
        try:
            return work()
        except (HostError, libvirt.libvirtError) as exc:
            if not any(message in str(exc) for message in RESTART_MESSAGES):
                raise
            time.sleep(RETRY_PAUSE)
    return work()


def pool_document(operation: Operation, names: list[str]) -> dict:
    pool = {"image": "tiny", "clone": operation.clone, "names": names, "network": "lab",
            "hardware": {"memory": "128MiB"}}
    if operation.method:
        pool["instant"] = {"method": operation.method}
    return pool


def inventory_parent_keys(path: Path) -> set[str]:
    """Return the parent keys of the inventory's instant pools, as apply derives them."""
    inventory = load_inventory(path)
    if not any(pool.clone == "instant" for pool in inventory.pools.values()):
        return set()
    made = plan.make_plan(inventory)
    try:
        return {parent.parent_key(action.request, action.request.instant,
                                  made.hosts[action.host].domain_type)
                for action in made.actions
                if action.request is not None and action.request.clone == "instant"}
    finally:
        made.close()


def desktop_problems(name: str, identity: tuple[str, str] | None = None,
                     image: str = "") -> list[str]:
    """Return why desktop ``name`` is not ready (and, with ``identity``, not the same UUID
    and MAC; with ``image``, not on that image ref); an empty list when it is."""
    def check() -> list[str]:
        with connection() as conn:
            return _desktop_problems(conn, name, identity, image)

    return retrying(check)


def _desktop_problems(conn: libvirt.virConnect, name: str,
                      identity: tuple[str, str] | None, image: str) -> list[str]:
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return [f"desktop {name} does not exist"]
    record = metadata.read(domain)
    if record is None:
        return [f"desktop {name} has no labctl record"]
    problems = []
    if record.state != "ready":
        problems.append(f"desktop {name} is {record.state}, not ready")
    if not domain.isActive():
        problems.append(f"desktop {name} is not running")
    if identity is not None and (domain.UUIDString(), record.mac) != identity:
        problems.append(f"desktop {name} lost its identity: {identity} became "
                        f"{(domain.UUIDString(), record.mac)}")
    if image and record.image != image:
        problems.append(f"desktop {name} is on image {record.image}, not {image}")
    return problems


def orphans(lab: Lab, desktops: list[str]) -> list[str]:
    """Return the lab's objects on the host other than ``desktops`` and usable parents."""
    def scan() -> list[str]:
        with connection() as conn:
            return _orphans(conn, lab, desktops)

    return retrying(scan)


def _orphans(conn: libvirt.virConnect, lab: Lab, desktops: list[str]) -> list[str]:
    keep_files: set[str] = set()
    for name in desktops:
        keep_files |= {f"labctl-{name}-os.qcow2", f"labctl-{name}-seed.iso"}
    usable = {}
    for domain, record in parent.inventory_parents(conn, lab.name):
        if parent.usable(record):
            usable[domain.name()] = record
            keep_files |= {os.path.basename(path) for path in (record.disk, record.seed,
                                                               record.state_file,
                                                               record.ram_file) if path}
    found = []
    disks = set()
    for domain in conn.listAllDomains(0):
        name = domain.name()
        if name.startswith(lab.prefix) and name not in desktops:
            found.append(f"domain {name}")
        if _has_key(name, lab.parent_keys) and name not in usable:
            found.append(f"domain {name}")
        if name in desktops:
            disks |= _disk_files(domain)
    for directory in (TEST_POOL_PATH, *lab.storage.values(), fork.RAM_DIR, FIFO_DIR):
        if not os.path.isdir(directory):
            continue
        for entry in os.listdir(directory):
            ours = f"-{lab.prefix}" in entry or _has_key(entry, lab.parent_keys)
            if ours and entry not in keep_files:
                found.append(f"file {directory}/{entry}")
            elif ours and lab.storage and entry.endswith("-os.qcow2") and (
                    f"{directory}/{entry}" not in disks):
                found.append(f"file {directory}/{entry} (a copy its desktop does not use)")
            elif _unused_replica(lab, directory, entry, disks):
                found.append(f"file {directory}/{entry} (a replica no desktop needs)")
    found += [f"journal operation {op.id} ({op.kind} of {op.desktop}) still running"
              for op in journal.operations(inventory=lab.name, state=journal.RUNNING)]
    return found


def _disk_files(domain: libvirt.virDomain) -> set[str]:
    """Return the files of the domain's disks and their backing chains, in both its
    persistent and its running definition."""
    files = set()
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        root = ET.fromstring(domain.XMLDesc(flags))
        files |= {source.get("file", "") for source in root.iter("source")}
    return files - {""}


def _unused_replica(lab: Lab, directory: str, entry: str, disks: set[str]) -> bool:
    """Return whether ``entry`` is a replica of the lab that its desktop does not need.

    That is any replica in the lab's own storage pool when no desktop disk is there. It
    is also a replica of one of the lab's image versions other than the desktop's.
    """
    if not entry.startswith("labctl-replica-"):
        return False
    if directory in lab.storage.values():
        return not any(os.path.dirname(disk) == directory for disk in disks)
    version = entry.removeprefix("labctl-replica-").split(".")[0]
    current = lab.expected_image.rpartition("@")[2]
    return version in {v.version for v in lab.versions.values()} and version != current


def _has_key(name: str, keys: set[str]) -> bool:
    return any(key in name for key in keys)


def run_case(lab: Lab, operation: Operation, step: str, desktop: str,
             before: Callable[[], tuple[str, str] | None], crash_in: str = "") -> CaseResult:
    """Kill labctl after ``step``, run the next command, and check convergence and orphans.

    ``before`` prepares the lab for the case and returns the identity a refresh must
    keep (None for the other operations). The crash hits ``crash_in`` (a parent VM's
    pattern or the desktop being deleted) or else ``desktop``.
    """
    started = time.monotonic()
    retries_before = lab.retries
    identity = before()
    target = f"{step}@{crash_in or desktop}"
    problems: list[str] = []
    extra = [desktop] if operation.command == "refresh" else []
    crashed = lab.labctl(operation.command, str(lab.path), *extra, crash=target)
    killed = crashed.returncode == KILLED
    if not killed:
        problems.append(f"labctl {operation.command} with {target} was not killed: "
                        f"exit {crashed.returncode}\n{crashed.stdout[-2000:]}"
                        f"\n{crashed.stderr[-2000:]}")
    applied = lab.labctl(operation.then, str(lab.path))
    if applied.returncode != 0:
        problems.append(f"the {operation.then} after the crash failed: exit "
                        f"{applied.returncode}\n{applied.stdout[-2000:]}\n"
                        f"{applied.stderr[-2000:]}")
    desktop_state = desktop_problems(desktop, identity, lab.expected_image)
    return CaseResult(operation.name, step, killed, not desktop_state,
                      orphans(lab, [desktop]), problems + desktop_state,
                      round(time.monotonic() - started, 1), lab.retries - retries_before)
