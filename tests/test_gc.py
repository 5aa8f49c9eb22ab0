"""labctl gc: it removes what a killed run left and never a foreign domain or volume.

The foreign objects have labctl-like names: a desktop name of the inventory, the
labctl-NAME-os.qcow2 volume pattern, a parent VM's name. They have no labctl metadata
and no journal record, so gc has no proof that they are labctl's and must leave them.
"""

from __future__ import annotations

import json
import os

import libvirt
import pytest
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl, unique_name

from orchestrator import journal
from orchestrator.storage import pool as volumes

pytestmark = pytest.mark.libvirt

COMMAND_TIMEOUT = 300
FOREIGN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices>
</domain>"""


def describe(result) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


@pytest.fixture
def foreign(conn):
    """A foreign domain named like a desktop, using a volume named like a labctl one, plus
    an unused volume and a domain named like labctl's, none with labctl metadata."""
    prefix = unique_name("g")
    storage = conn.storagePoolLookupByName(TEST_POOL)
    used = volumes.create_empty(storage, f"labctl-{prefix}9-os.qcow2", 1 << 20, fmt="qcow2")
    loose = volumes.create_empty(storage, f"labctl-{prefix}1-seed.iso.old", 1 << 20)
    domains = [conn.defineXML(FOREIGN_XML.format(name=f"{prefix}9", disk=used.path())),
               conn.defineXML(FOREIGN_XML.format(name=f"labctl-parent-{prefix}-1",
                                                 disk=used.path()))]
    names = {"prefix": prefix, "domains": [d.name() for d in domains],
             "volumes": [used.name(), loose.name()]}
    yield names
    for domain in domains:
        if domain_exists(conn, domain.name()):
            domain.undefine()
    for name in names["volumes"]:
        volumes.delete(storage, name)


def survivors(conn: libvirt.virConnect, foreign: dict) -> list[str]:
    """Return the foreign objects that no longer exist."""
    missing = [f"domain {name}" for name in foreign["domains"] if not domain_exists(conn, name)]
    missing += [f"volume {name}" for name in foreign["volumes"]
                if not os.path.exists(os.path.join(TEST_POOL_PATH, name))]
    return missing


def test_gc_removes_crash_leftovers(make_inventory, conn, foreign):
    prefix = foreign["prefix"]
    desktop = f"{prefix}1"
    path = make_inventory({"lab": {"image": "tiny", "clone": "linked", "names": [desktop],
                                   "network": "lab", "hardware": {"memory": "128MiB"}}},
                          hosts={"local": {"uri": URI, "storage": {"pool": TEST_POOL,
                                                                   "path": TEST_POOL_PATH}}})
    crashed = run_labctl("apply", str(path), timeout=COMMAND_TIMEOUT,
                         env={journal.CRASH_VARIABLE: f"start@{desktop}"})
    assert crashed.returncode == -9, f"the crash hook did not kill labctl: {describe(crashed)}"
    assert domain_exists(conn, desktop), "the killed run left no domain to collect"

    listed = run_labctl("gc", str(path), "--dry-run", "-o", "json", timeout=COMMAND_TIMEOUT)
    assert listed.returncode == 0, describe(listed)
    found = {(item["kind"], item["name"]) for item in json.loads(listed.stdout)["leftovers"]}
    expected = {("domain", desktop), ("volume", f"labctl-{desktop}-os.qcow2"),
                ("volume", f"labctl-{desktop}-seed.iso")}
    assert expected <= found, f"gc --dry-run missed leftovers: {found}"
    foreign_names = set(foreign["domains"]) | set(foreign["volumes"])
    assert not {name for _kind, name in found} & foreign_names, f"gc lists foreign: {found}"
    assert domain_exists(conn, desktop), "gc --dry-run removed the domain"

    everything = run_labctl("gc", "--dry-run", "-o", "json", timeout=COMMAND_TIMEOUT)
    assert everything.returncode == 0, describe(everything)
    listed_all = {item["name"] for item in json.loads(everything.stdout)["leftovers"]}
    assert not listed_all & foreign_names, f"gc without inventory lists foreign: {listed_all}"

    removed = run_labctl("gc", str(path), timeout=COMMAND_TIMEOUT)
    assert removed.returncode == 0, describe(removed)
    assert not domain_exists(conn, desktop), "gc left the killed run's domain"
    for name in (f"labctl-{desktop}-os.qcow2", f"labctl-{desktop}-seed.iso"):
        assert not os.path.exists(os.path.join(TEST_POOL_PATH, name)), f"gc left {name}"
    assert survivors(conn, foreign) == [], "gc removed objects labctl did not make"
    inventory = path.stem.rsplit("-", 1)[0]
    still_open = journal.operations(inventory=inventory, state=journal.RUNNING)
    assert still_open == [], f"journal operations left running: {still_open}"

    again = run_labctl("gc", str(path), "--dry-run", "-o", "json", timeout=COMMAND_TIMEOUT)
    # Replicas are shared with other tests, which may stop using one at any moment.
    left = [item for item in json.loads(again.stdout)["leftovers"] if item["kind"] != "replica"]
    assert left == [], f"a second gc still finds leftovers: {left}"


def test_gc_skips_inactive_storage_pool(conn, tmp_path):
    """A journal naming a storage pool that is defined but stopped: gc warns, goes on."""
    name = unique_name("gi")
    storage = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{tmp_path}</path></target></pool>")
    desktop = f"{name}1"
    operation = journal.begin(
        "provision", inventory=name, desktop=desktop, host="local", uri=URI,
        storage_pool=name,
        artifacts=journal.Artifacts(domain=desktop, volumes=(f"labctl-{desktop}-os.qcow2",)))
    journal.finish(operation, "done")
    try:
        listed = run_labctl("gc", "--dry-run", "-o", "json", timeout=COMMAND_TIMEOUT)
    finally:
        storage.undefine()
    assert listed.returncode == 0, describe(listed)
    assert f"storage pool {name} on {URI} is not active" in listed.stderr, describe(listed)
    assert "virsh pool-start" in listed.stderr, describe(listed)
