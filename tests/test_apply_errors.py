"""Errors of labctl plan and apply: bad input, a foreign domain in the way, a failed boot.

Every failure must be one line on stderr naming what is wrong and where, and must leave
the host as it was. Other xdist workers create desktops in the same storage pool at the
same time, so "as it was" is checked on the names this test made up, not on totals.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl, unique_name

from orchestrator import plan
from orchestrator.hosts.context import HostContext, HostSettings, open_host
from orchestrator.identity import keys
from orchestrator.apply import provision
from orchestrator.provision.request import DesktopRequest, NetworkSpec
from orchestrator.provision.steps import StepFailed
from orchestrator.state import metadata
from orchestrator.storage import pool as volumes
from orchestrator.storage import replica

pytestmark = pytest.mark.libvirt

COMMAND_TIMEOUT = 120
CLOSED_URI = "qemu+tcp://127.0.0.1:1/system"
FOREIGN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>"""
MALFORMED_YAML = "name: {name}\npools:\n  lab:\n    image: [tiny\n    clone: linked\n"
# The line where parsing MALFORMED_YAML fails, because the unclosed flow sequence runs into it.
MALFORMED_LINE = 5
# Random data, so that copying it into a qcow2 volume takes long enough to overlap.
BUILD_SOURCE_BYTES = 256 << 20


def pool(prefix: str, size: int = 1, clone: str = "linked") -> dict:
    return {"image": "tiny", "clone": clone, "size": size, "naming": f"{prefix}{{n}}",
            "network": "lab", "hardware": {"memory": "128MiB"}}


def line_number(path: Path, keys_path: tuple[str, ...]) -> int:
    """Return the 1-based line of a block-style YAML key path, as yaml.safe_dump writes it."""
    lines = path.read_text().splitlines()
    index = -1
    for key in keys_path:
        index = next(number for number in range(index + 1, len(lines))
                     if lines[number].strip().startswith(f"{key}:"))
    return index + 1


def footprint(conn: libvirt.virConnect, prefix: str) -> tuple[list[str], list[str]]:
    """Return the domains and volumes on the host whose names contain ``prefix``."""
    domains = sorted(d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix))
    try:
        storage = conn.storagePoolLookupByName(TEST_POOL)
    except libvirt.libvirtError:
        return domains, []
    # No refresh: libvirt rejects it while another worker builds a volume, and it lists
    # the volumes created through its API without one.
    names = sorted(v.name() for v in storage.listAllVolumes(0) if f"-{prefix}" in v.name())
    return domains, names


def single_error_line(result: subprocess.CompletedProcess, where: str) -> str:
    """Assert that a failed run printed one error line starting at ``where``, and return it."""
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, f"expected a failure: {report}"
    assert "Traceback" not in result.stderr, report
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr: {report}"
    assert lines[0].startswith("labctl: error: "), report
    assert re.match(rf"labctl: error: {re.escape(where)}\b", lines[0]), (
        f"the error does not start with {where}: {lines[0]}"
    )
    return lines[0]


def domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


# A foreign domain in the way of a pool.


def test_foreign_domain_conflict(make_inventory, conn):
    prefix = unique_name("x")
    path = make_inventory({"lab": pool(prefix, 2)}, name=unique_name("t"))
    foreign = f"{prefix}2"
    conn.defineXML(FOREIGN_XML.format(name=foreign))
    try:
        where = f"{path}:{line_number(path, ('pools', 'lab', 'naming'))}"
        for command in ("plan", "apply"):
            result = run_labctl(command, str(path), timeout=COMMAND_TIMEOUT)
            line = single_error_line(result, where)
            assert foreign in line, f"{command}: the error does not name {foreign}: {line}"
            assert "not created by labctl" in line, line
            assert footprint(conn, prefix) == ([foreign], []), f"{command} created something"
        destroyed = run_labctl("destroy", str(path), timeout=COMMAND_TIMEOUT)
        assert destroyed.returncode == 0, destroyed.stderr
        assert domain_exists(conn, foreign), "destroy removed a domain labctl did not create"
        assert metadata.read(conn.lookupByName(foreign)) is None, "labctl wrote into it"
    finally:
        if domain_exists(conn, foreign):
            conn.lookupByName(foreign).undefine()


# A domain that vanishes while labctl lists the host's domains.


@pytest.fixture
def pool_host() -> HostContext:
    """A host context on the test storage pool, as labctl apply opens it."""
    ctx = open_host(HostSettings(name="local", uri=URI, storage_pool=TEST_POOL,
                                 storage_path=TEST_POOL_PATH))
    yield ctx
    ctx.close()


def test_plan_skips_removed_domain(pool_host, conn, monkeypatch):
    """A domain removed between listing and reading its metadata is not an error."""
    name = unique_name("v")
    conn.defineXML(FOREIGN_XML.format(name=name))
    stale = pool_host.conn.lookupByName(name)
    conn.lookupByName(name).undefine()
    listed = pool_host.conn.listAllDomains(0)
    monkeypatch.setattr(pool_host.conn, "listAllDomains", lambda flags=0: [*listed, stale])
    assert plan.observed_desktops(pool_host, unique_name("t")) == {}


# A failure midway rolls back.


def tiny_request(name: str, image, *, ready_timeout: float) -> DesktopRequest:
    return DesktopRequest(
        name=name, inventory=unique_name("t"), pool="lab", index=1, clone="linked",
        image=image, host="local", memory_bytes=128 << 20,
        network=NetworkSpec(name="lab", mode="user"), ready_timeout=ready_timeout,
    )


def test_ready_timeout_rolls_back(pool_host, conn, tiny_image):
    name = unique_name("w")
    events: list[tuple[str, str]] = []
    request = tiny_request(name, tiny_image, ready_timeout=1.0)
    access_key = keys.generate_ed25519("labctl-test")
    try:
        with pytest.raises(StepFailed) as caught:
            provision(pool_host, request, access_key,
                                   lambda desktop, step, status: events.append((step, status)))
    finally:
        replica.remove_unused(pool_host.pool)
    assert caught.value.step == "ready", f"failed at {caught.value.step}: {caught.value}"
    assert caught.value.where == name
    assert "'ready'" in str(caught.value)
    undone = [step for step, status in events if status == "undone"]
    assert undone == ["start", "define", "seed", "os-disk"], f"undo order: {events}"
    assert not domain_exists(conn, name), "the failed desktop's domain is still defined"
    assert footprint(conn, name) == ([], []), "the failed desktop left volumes"


@pytest.fixture
def private_host(conn) -> HostContext:
    """A host context on a storage pool of its own, which no other test uses."""
    name = unique_name("labctl-race-")
    ctx = open_host(HostSettings(name="local", uri=URI, storage_pool=name,
                                 storage_path=f"/var/lib/labctl/{name}"))
    yield ctx
    try:
        storage = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        ctx.close()
        return
    storage.refresh(0)
    for volume in storage.listAllVolumes(0):
        volume.delete(0)
    storage.destroy()
    storage.delete(0)
    storage.undefine()
    ctx.close()


def test_replica_kept_while_provisioning(private_host, monkeypatch, tiny_image):
    """A replica nothing uses yet must survive a cleanup between its upload and the overlay.

    ``replica.remove_unused`` runs at the end of every apply and destroy, of any inventory.
    """
    create_overlay, upload_bytes = volumes.create_overlay, volumes.upload_bytes
    cleaners: list[threading.Thread] = []
    cleanup_errors: list[BaseException] = []

    def clean_up() -> None:
        try:
            replica.remove_unused(private_host.pool)
        except BaseException as exc:  # reported by the test's assert, not lost in the thread
            cleanup_errors.append(exc)

    def overlay_after_cleanup(*args, **kwargs):
        # What a labctl destroy of another inventory does at this moment. It runs in its own
        # thread, so a lock held by provisioning makes it wait instead of deadlocking.
        cleaner = threading.Thread(target=clean_up)
        cleaner.start()
        cleaners.append(cleaner)
        cleaner.join(timeout=3)
        return create_overlay(*args, **kwargs)

    def upload_after_cleanup(*args, **kwargs):
        # The seed upload comes after the os-disk step. Letting the cleanup end here keeps
        # it from overlapping the rollback of the failed ready step.
        for cleaner in cleaners:
            cleaner.join()
        return upload_bytes(*args, **kwargs)

    monkeypatch.setattr(volumes, "create_overlay", overlay_after_cleanup)
    monkeypatch.setattr(volumes, "upload_bytes", upload_after_cleanup)
    request = tiny_request(unique_name("w"), tiny_image, ready_timeout=1.0)
    try:
        with pytest.raises(StepFailed) as caught:
            provision(private_host, request, keys.generate_ed25519("labctl-test"),
                                   lambda desktop, step, status: None)
    finally:
        for cleaner in cleaners:
            cleaner.join()
    assert cleaners, "provisioning no longer calls storage.pool.create_overlay; update this test"
    assert not cleanup_errors, f"the concurrent replica cleanup failed: {cleanup_errors!r}"
    assert caught.value.step == "ready", f"failed at {caught.value.step}: {caught.value}"


def test_cleanup_during_volume_build(private_host, conn):
    """remove_unused must work while another client builds a volume in the same pool."""
    storage = private_host.pool
    source = volumes.create_empty(storage, "labctl-build-source.raw", BUILD_SOURCE_BYTES)
    subprocess.run(["dd", "if=/dev/urandom", f"of={source.path()}", "bs=1M",
                    f"count={BUILD_SOURCE_BYTES >> 20}", "conv=notrunc", "status=none"],
                   check=True)
    copy_xml = volumes.volume_xml("labctl-build-copy.qcow2", BUILD_SOURCE_BYTES, "qcow2",
                                  allocation=0)
    builder = threading.Thread(target=storage.createXMLFrom, args=(copy_xml, source, 0))
    builder.start()
    try:
        observer = conn.storagePoolLookupByName(storage.name())
        deadline = time.monotonic() + 30
        while "labctl-build-copy.qcow2" not in observer.listVolumes():
            assert time.monotonic() < deadline, "the volume build did not start"
            time.sleep(0.01)
        assert builder.is_alive(), "the copy ended before the cleanup; use a larger source"
        removed = replica.remove_unused(observer)
    finally:
        builder.join()
    assert removed == [], f"removed volumes that are not replicas: {removed}"


# Bad input changes nothing on the host.


@dataclass(frozen=True)
class BadInput:
    path: Path
    where: tuple[str, ...] | int
    phrase: str


@dataclass(frozen=True)
class Setup:
    make_inventory: Callable[..., Path]
    tmp_path: Path
    conn: libvirt.virConnect
    prefix: str


def unreachable_uri(setup: Setup) -> BadInput:
    storage = {"pool": TEST_POOL, "path": TEST_POOL_PATH}
    path = setup.make_inventory({"lab": pool(setup.prefix)},
                                hosts={"local": {"uri": CLOSED_URI, "storage": storage}})
    return BadInput(path, ("hosts", "local", "uri"), "cannot connect to libvirt")


def missing_image(setup: Setup) -> BadInput:
    images = {"tiny": {"path": str(setup.tmp_path / "missing.qcow2")}}
    path = setup.make_inventory({"lab": pool(setup.prefix)}, images=images)
    return BadInput(path, ("images", "tiny"), "image file not found")


def broken_backing(setup: Setup) -> BadInput:
    base, top = setup.tmp_path / "base.qcow2", setup.tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    base.unlink()
    path = setup.make_inventory({"lab": pool(setup.prefix)}, images={"tiny": {"path": str(top)}})
    return BadInput(path, ("images", "tiny"), str(base))


def memory_too_large(setup: Setup) -> BadInput:
    host_mib = setup.conn.getInfo()[1]
    too_large = {**pool(setup.prefix), "hardware": {"memory": f"{host_mib * 2}MiB"}}
    path = setup.make_inventory({"lab": too_large})
    return BadInput(path, ("pools", "lab", "hardware", "memory"), "MiB of memory")


def colliding_pools(setup: Setup) -> BadInput:
    # Pools with the same pattern share its numbers. These two patterns differ, but both
    # make {prefix}1.
    other = {**pool(setup.prefix, clone="full"), "naming": f"{setup.prefix}{{n:fixed=1}}"}
    pools = {"lab": pool(setup.prefix), "other": other}
    path = setup.make_inventory(pools)
    return BadInput(path, ("pools", "other", "naming"), "both make the desktop")


def undefined_image(setup: Setup) -> BadInput:
    path = setup.make_inventory({"lab": {**pool(setup.prefix), "image": "missing"}})
    return BadInput(path, ("pools", "lab", "image"), "not defined under images")


def malformed_yaml(setup: Setup) -> BadInput:
    path = setup.tmp_path / "malformed.yaml"
    path.write_text(MALFORMED_YAML.format(name=unique_name("t")))
    return BadInput(path, MALFORMED_LINE, "invalid YAML")


BAD_INPUTS = [unreachable_uri, missing_image, broken_backing, memory_too_large,
              colliding_pools, undefined_image, malformed_yaml]


@pytest.mark.parametrize("make_case", BAD_INPUTS, ids=[case.__name__ for case in BAD_INPUTS])
def test_bad_input_rejected(make_case, make_inventory, tmp_path, conn):
    prefix = unique_name("e")
    case = make_case(Setup(make_inventory, tmp_path, conn, prefix))
    line = case.where if isinstance(case.where, int) else line_number(case.path, case.where)
    before = footprint(conn, prefix)
    assert before == ([], []), f"names of this test were taken before it ran: {before}"
    for command in ("plan", "apply"):
        result = run_labctl(command, str(case.path), timeout=COMMAND_TIMEOUT)
        error = single_error_line(result, f"{case.path}:{line}")
        assert case.phrase in error, f"{command}: expected {case.phrase!r} in: {error}"
        assert footprint(conn, prefix) == before, f"{command} changed the host"

