"""Faults during labctl apply: a guest that never responds, an unreadable replica, a full
storage pool (replica copy, full clone, parent save) and a libvirtd restart.

Each fault must end the apply with one error line naming the desktop and the failed
step, leave nothing of the failed desktop on the host, and let the next apply (after
the fault is removed) converge. Each test has a storage pool of its own, so a fault
never reaches another worker's desktops or replicas. The libvirtd restart reaches every
libvirt client on the machine, so it is marked disruptive and runs alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import REPO, URI, run_labctl, unique_name
from faultkit import PrivatePool, can_restart_libvirtd, fill, restart_libvirtd, shared_filesystem
from test_controller import ControllerProcess, delete_behind_back, is_pass

from orchestrator.instant import fork
from orchestrator.storage.replica import PREFIX as REPLICA_PREFIX

pytestmark = pytest.mark.libvirt

COMMAND_TIMEOUT = 600
# Large enough for the tiny image's replica (about 21 MB), a parent's save image and a
# few desktops, small enough to fill in a moment.
FILESYSTEM_BYTES = 192 << 20
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
# Seconds libvirtd stays stopped while a controller runs (passes every 2 s).
LIBVIRTD_DOWN = 10
# What a desktop on the tiny image needs besides the replica: overlay and seed, with room.
DESKTOP_BYTES = 4 << 20


def tiny_pool(prefix: str, clone: str = "linked", size: int = 1, **extra) -> dict:
    return {"image": "tiny", "clone": clone, "size": size, "naming": f"{prefix}{{n}}",
            "network": "lab", "hardware": {"memory": "128MiB"}, **extra}


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def step_error(result: subprocess.CompletedProcess, desktop: str, step: str) -> str:
    """Assert that apply failed on ``desktop`` at ``step`` and return that error line."""
    report = describe(result)
    assert result.returncode != 0, f"expected apply to fail: {report}"
    assert "Traceback" not in result.stderr, report
    for line in result.stderr.splitlines():
        # Errors are one line each; warnings and errors logged on the way carry a date.
        assert line.startswith("labctl: ") or LOG_LINE.match(line), f"stray line {line!r}: {report}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("labctl: error: ")]
    assert errors, f"no error line: {report}"
    prefix = f"labctl: error: {desktop}: step {step!r} failed: "
    matching = [line for line in errors if line.startswith(prefix)]
    assert matching, f"no error line starts with {prefix!r}: {report}"
    print(matching[0])  # shown by pytest -rP: the error text a user sees
    return matching[0]


def domains_named(conn: libvirt.virConnect, *parts: str) -> list[str]:
    return sorted(d.name() for d in conn.listAllDomains(0)
                  if any(part in d.name() for part in parts))


def ram_files(*parts: str) -> list[str]:
    if not os.path.isdir(fork.RAM_DIR):
        return []
    return sorted(f for f in os.listdir(fork.RAM_DIR) if any(part in f for part in parts))


def desktop_files(pool: PrivatePool, name: str) -> list[str]:
    return [f for f in pool.files() if f"-{name}-" in f]


def assert_replicas_whole(files: list[str]) -> None:
    """Assert that every replica in ``files`` has its completion marker: none is half-made.

    An apply that failed removes replicas no desktop uses, so no replica at all is fine.
    """
    versions = {f.split(".")[0] for f in files if f.startswith(REPLICA_PREFIX)}
    for version in versions:
        assert f"{version}.complete" in files, f"replica {version} is incomplete: {files}"


def assert_ready(path: Path, names: list[str]) -> dict[str, dict]:
    """Assert that ``labctl status`` lists exactly ``names``, each running and recorded ready
    (status shows a record state other than ready after the domain state); return them."""
    result = run_labctl("status", str(path), "-o", "json", timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, describe(result)
    desktops = {d["name"]: d for pool in json.loads(result.stdout)["pools"]
                for d in pool["desktops"]}
    assert sorted(desktops) == sorted(names), f"desktops after apply: {sorted(desktops)}"
    for name, desktop in desktops.items():
        assert desktop["state"] == "running", f"{name} is {desktop['state']}"
    return desktops


def apply_ok(path: Path) -> None:
    """Clear the pools a fault stopped (stop_on_error is on by default), then apply."""
    for pool in yaml.safe_load(path.read_text())["pools"]:
        cleared = run_labctl("clear", str(path), pool, timeout=COMMAND_TIMEOUT)
        assert cleared.returncode == 0, describe(cleared)
    result = run_labctl("apply", str(path), timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, f"the apply after the fault failed: {describe(result)}"


@pytest.fixture
def private_pool(tmp_path):
    """A storage pool of this test in its own directory under /var/lib/labctl."""
    pool = PrivatePool(Path("/var/lib/labctl") / unique_name("labctl-fault-"), tmp_path)
    yield pool
    problems = pool.close()
    assert not problems, problems


@pytest.fixture
def small_pool(tmp_path):
    """A storage pool of this test on a small filesystem, mounted for libvirtd too."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    with shared_filesystem(FILESYSTEM_BYTES) as filesystem:
        pool = PrivatePool(filesystem / "pool", tmp_path, on_filesystem=True)
        try:
            yield pool
        finally:
            problems = pool.close()
        assert not problems, problems


# A guest that never responds.


def test_guest_never_responds(private_pool, conn, tmp_path):
    """An image without a guest agent (here: a blank disk) times out at the ready step."""
    prefix = unique_name("na")
    name = f"{prefix}1"
    blank = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "64M"], check=True)
    path = private_pool.inventory({"lab": {**tiny_pool(prefix), "image": "blank"}},
                                  images={"blank": {"path": str(blank)}},
                                  host={"ready_timeout": 5})
    result = run_labctl("apply", str(path), timeout=COMMAND_TIMEOUT)
    line = step_error(result, name, "ready")
    assert "guest agent did not respond" in line, line
    assert "within 5 s" in line, line
    assert domains_named(conn, name) == [], "the domain of the failed desktop is still there"
    assert desktop_files(private_pool, name) == [], private_pool.files()

    fixed = private_pool.inventory({"lab": tiny_pool(prefix)}, name=path.stem)
    assert fixed == path
    apply_ok(path)
    assert_ready(path, [name])


# A replica made unreadable.


def test_replica_unreadable(private_pool, conn, tiny_image):
    prefix = unique_name("ur")
    name = f"{prefix}1"
    path = private_pool.inventory({"lab": tiny_pool(prefix)})
    disk = Path(private_pool.upload_replica(tiny_image).disk.path)
    disk.chmod(0o000)
    try:
        result = run_labctl("apply", str(path), timeout=COMMAND_TIMEOUT)
    finally:
        # The failed apply removes the replica, because no desktop uses it.
        if disk.exists():
            disk.chmod(0o444)
    line = step_error(result, name, "os-disk")
    assert disk.name in line, f"the error does not name the replica: {line}"
    assert "not readable" in line, line
    assert f"chmod 0444 {disk}" in line, f"the error does not say how to fix it: {line}"
    assert domains_named(conn, name) == [], "the domain of the failed desktop is still there"
    assert desktop_files(private_pool, name) == [], private_pool.files()

    apply_ok(path)
    assert_ready(path, [name])


# A full storage pool.


def test_full_pool_replica_copy(small_pool, conn):
    """The replica does not fit: nothing of it stays, and the next apply uploads it whole."""
    prefix = unique_name("fr")
    name = f"{prefix}1"
    path = small_pool.inventory({"lab": tiny_pool(prefix)})
    filler = fill(small_pool.path.parent, DESKTOP_BYTES)
    result = run_labctl("apply", str(path), timeout=COMMAND_TIMEOUT)
    line = step_error(result, name, "os-disk")
    assert "replica" in line, f"the error does not name the replica: {line}"
    assert "check free space in the storage pool" in line, line
    assert domains_named(conn, name) == [], "the domain of the failed desktop is still there"
    assert small_pool.files() == [], f"left in the full pool: {small_pool.files()}"

    filler.unlink()
    apply_ok(path)
    assert_ready(path, [name])


def test_full_pool_full_clone(small_pool, conn, tiny_image):
    prefix = unique_name("ff")
    name = f"{prefix}1"
    path = small_pool.inventory({"lab": tiny_pool(prefix, "full")})
    small_pool.upload_replica(tiny_image)
    filler = fill(small_pool.path.parent, 0)
    result = run_labctl("apply", str(path), timeout=COMMAND_TIMEOUT)
    line = step_error(result, name, "os-disk")
    assert "check free space in the storage pool" in line, line
    assert domains_named(conn, name) == [], "the domain of the failed desktop is still there"
    assert desktop_files(small_pool, name) == [], small_pool.files()
    assert_replicas_whole(small_pool.files())

    filler.unlink()
    apply_ok(path)
    assert_ready(path, [name])


def test_full_pool_parent_save(small_pool, conn, tiny_image):
    """The parent's save image does not fit: no parent, no child, no state file stays."""
    prefix = unique_name("fs")
    name = f"{prefix}1"
    path = small_pool.inventory(
        {"kids": tiny_pool(prefix, "instant", instant={"method": "restore"})})
    small_pool.upload_replica(tiny_image)
    filler = fill(small_pool.path.parent, DESKTOP_BYTES)
    result = run_labctl("apply", str(path), timeout=COMMAND_TIMEOUT)
    line = step_error(result, name, "parent")
    parent_name = re.search(r"step 'parent' failed: (labctl-parent-[0-9a-f]+-\d+): step 'save' "
                            r"failed: ", line)
    assert parent_name, f"the error does not name the parent and its save step: {line}"
    assert "check free space in the storage pool" in line, line
    assert domains_named(conn, name) == [], "the domain of the failed desktop is still there"
    assert desktop_files(small_pool, name) == [], small_pool.files()
    assert domains_named(conn, parent_name.group(1)) == [], "the parent is still defined"
    parent_files = [f for f in small_pool.files() if parent_name.group(1) in f]
    assert parent_files == [], f"the failed parent build left {parent_files}"
    assert ram_files(parent_name.group(1)) == []
    assert_replicas_whole(small_pool.files())

    filler.unlink()
    apply_ok(path)
    assert_ready(path, [name])


# libvirtd restarted in the middle of an apply.


def read_events_until(process: subprocess.Popen, matches, timeout: float) -> list[dict]:
    """Read apply's JSON event lines until ``matches(event)`` is true; return the events."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    for line in process.stdout:
        event = json.loads(line)
        events.append(event)
        if matches(event):
            return events
        assert time.monotonic() < deadline, f"no matching event within {timeout} s: {events}"
    raise AssertionError(f"apply ended before the expected event: {events}")


@pytest.mark.disruptive
def test_libvirtd_restart_mid_apply(private_pool):
    """libvirtd restarts while desktops boot: apply fails clearly, the next one converges."""
    reason = can_restart_libvirtd(URI)
    if reason:
        pytest.skip(reason)
    prefix = unique_name("lr")
    names = [f"{prefix}{n}" for n in (1, 2, 3)]
    path = private_pool.inventory({"lab": tiny_pool(prefix, size=3)})
    process = subprocess.Popen([sys.executable, "-m", "orchestrator", "apply", str(path),
                                "-o", "json"], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        events = read_events_until(
            process, lambda e: e.get("step") == "start" and e["status"].startswith("done"),
            timeout=COMMAND_TIMEOUT)
        restart_libvirtd()
        rest, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    result = subprocess.CompletedProcess(process.args, process.returncode,
                                         "".join(json.dumps(e) + "\n" for e in events) + rest,
                                         stderr)
    print(describe(result))  # shown by pytest -rP: what labctl printed
    assert "Traceback" not in result.stderr, describe(result)
    if result.returncode != 0:
        failed = [line for line in result.stderr.splitlines()
                  if line.startswith("labctl: error: ")]
        assert failed, f"apply failed without an error line: {describe(result)}"
        steps = [line for line in failed
                 if re.match(rf"labctl: error: {prefix}\d: step '[a-z-]+' failed: ", line)]
        assert steps, f"no error names a desktop and its step: {describe(result)}"
        fixes = [line for line in failed if "check that libvirtd runs" in line]
        assert len(fixes) == 1, f"the fix must be given once, not per desktop: {failed}"

    apply_ok(path)
    desktops = assert_ready(path, names)
    macs = [desktop["mac"] for desktop in desktops.values()]
    assert len(set(macs)) == len(macs), f"duplicate MACs after recovery: {macs}"
    expected = sorted(f"labctl-{name}-{part}" for name in names
                      for part in ("os.qcow2", "seed.iso"))
    own = sorted(f for f in private_pool.files() if not f.startswith(REPLICA_PREFIX))
    assert own == expected, f"volumes after recovery: {own}"
    assert_replicas_whole(private_pool.files())
    conn = libvirt.open(URI)
    try:
        found = domains_named(conn, prefix)
        uuids = {conn.lookupByName(name).UUIDString() for name in names}
    finally:
        conn.close()
    assert found == names, f"domains after recovery: {found}"
    assert len(uuids) == len(names), "duplicate UUIDs after recovery"


@pytest.mark.disruptive
def test_controller_survives_libvirtd_restart(private_pool):
    """libvirtd restarts under `labctl run`: its next passes open a new connection, re-create
    a desktop deleted behind its back after the restart, and the controller keeps running."""
    reason = can_restart_libvirtd(URI)
    if reason:
        pytest.skip(reason)
    prefix = unique_name("cr")
    names = [f"{prefix}1", f"{prefix}2"]
    path = private_pool.inventory({"lab": tiny_pool(prefix, size=2)})
    controller = ControllerProcess(path)
    try:
        created: set[str] = set()
        while created != set(names):
            created.update(controller.wait_for("pass that made a desktop", lambda line: is_pass(
                line) and bool(line["created"]), timeout=COMMAND_TIMEOUT)["created"])
        # Down long enough for several passes at a 2 s interval to meet no libvirtd.
        restart_libvirtd(down_for=LIBVIRTD_DOWN)
        conn = libvirt.open(URI)
        try:
            delete_behind_back(conn, names[0])
        finally:
            conn.close()
        controller.wait_for(f"pass that re-created {names[0]}", lambda line: is_pass(line) and (
            names[0] in line["created"]), timeout=COMMAND_TIMEOUT)
        print(controller.describe())  # shown by pytest -rP: the passes around the restart
        assert controller.process.poll() is None, f"the controller ended\n{controller.describe()}"
        assert "Traceback" not in "".join(controller.stderr), controller.describe()
        warnings = [line for line in controller.stderr
                    if " WARNING " in line and "lost the connection to libvirtd" in line]
        assert len(warnings) == 1, f"one warning per outage expected: {warnings}"
        assert f"host local ({URI})" in warnings[0], "the warning must name the host"
        failed = [line for line in controller.seen if is_pass(line) and line["error"]]
        assert failed, "no pass met the stopped libvirtd"
        # Passes at 2, 4, 8 s... meet the outage: no busy loop.
        assert len(failed) <= 4, f"{len(failed)} passes in {LIBVIRTD_DOWN} s: no backoff"
        assert any("connected to libvirtd again" in line for line in controller.stderr), \
            controller.describe()
        assert controller.stop() == 0, controller.describe()
    except BaseException:
        print(controller.describe())  # what the controller did up to the failure
        raise
    finally:
        controller.close()
    assert_ready(path, names)


# A write into a socket or pipe whose reader went away.

SIGPIPE_AFTER_MAIN = """
import signal, sys
from orchestrator import cli
cli.main(["schema"])
print(signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN, file=sys.stderr)
"""


def test_sigpipe_stays_ignored():
    """libvirt writes to its socket without MSG_NOSIGNAL: with SIGPIPE's default action, a
    libvirtd that goes away during a write would end labctl without a message."""
    result = subprocess.run([sys.executable, "-c", SIGPIPE_AFTER_MAIN], cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "True", f"SIGPIPE is not ignored: {result.stderr}"


def test_closed_stdout_exits_quietly():
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([sys.executable, "-m", "orchestrator", "schema"], cwd=REPO,
                                text=True, stdout=writer, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(writer)
    assert result.returncode == 141, f"exit {result.returncode}: {result.stderr}"
    assert result.stderr == "", f"labctl printed on a closed stdout: {result.stderr}"
