"""Tests against libvirt's test driver (test:///default): metadata and the allocators.

The test driver keeps its domains in memory per process, so these tests need no
libvirtd. It accepts labctl's domain XML but drops <qemu:commandline> (checked by
``test_driver_drops_qemu_args``), so NICs given as QEMU arguments are checked with a
stub connection that returns the rendered XML unchanged.
"""

from __future__ import annotations

import socket
import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace
from types import SimpleNamespace

import libvirt
import pytest

from orchestrator import apply
from orchestrator.domain import Disk, DomainSpec, Interface, UserNetwork, render_domain
from orchestrator.hosts.connection import open_connection
from orchestrator.hosts.context import HostSettings
from orchestrator.identity import allocate
from orchestrator.identity.allocate import HostAllocator, used_forward_ports, used_macs
from orchestrator.plan import Action
from orchestrator.provision.remove import remove_desktop
from orchestrator.state import metadata
from orchestrator.state.metadata import DesktopRecord

URI = "test:///default"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
HOSTILE = "<a & 'b'> \"c\"\nd ]]> $(reboot); rm -rf / ../ a: b - x {{ y }}"


@pytest.fixture
def conn():
    connection = open_connection(URI)
    yield connection
    connection.close()


@pytest.fixture
def define(conn):
    """Define domains on the test driver; undefine them when the test ends."""
    defined: list[libvirt.virDomain] = []

    def make(spec: DomainSpec) -> libvirt.virDomain:
        domain = conn.defineXML(render_domain(spec))
        defined.append(domain)
        return domain

    yield make
    for domain in defined:
        if domain.isActive():
            domain.destroy()
        domain.undefine()


def record(**changes: object) -> DesktopRecord:
    base = DesktopRecord(
        inventory="demo", pool="linked", index=1, clone="linked", image="tiny@0123456789ab",
        host="local", hostname="td-1", fqdn="td-1.lab.test",
        machine_id="7c9e6679742540de944be07fc1f90ae7", mac="52:54:00:00:00:01",
        disk="/pool/td-1-os.qcow2", ssh_port=22005, created="2024-05-01T12:00:00+00:00",
        extra={"network_mode": "user"},
    )
    return replace(base, **changes)


def spec(name: str, *, meta: DesktopRecord | None = None, interfaces=(), user_network=None,
         extra_qemu_args: tuple[str, ...] = ()) -> DomainSpec:
    return DomainSpec(
        name=name, uuid=str(uuid.uuid4()), domain_type="qemu", memory_kib=131072, vcpus=1,
        disks=(Disk(f"/pool/{name}.qcow2", "qcow2", "vda"),),
        metadata_xml=metadata.to_xml(meta) if meta else "",
        interfaces=tuple(interfaces), user_network=user_network,
        extra_qemu_args=extra_qemu_args,
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- metadata -------------------------------------------------------------------------------


def test_metadata_read_back(define):
    stored = record()
    domain = define(spec(unique("md"), meta=stored))
    assert metadata.read(domain) == stored


def test_metadata_hostile_read_back(define):
    stored = record(hostname=HOSTILE, disk=HOSTILE, user="cr\rlf\ntab\t",
                    extra={HOSTILE: HOSTILE, "ssh_host_key": "ssh-ed25519 AAAA x@y"})
    domain = define(spec(unique("mdh"), meta=stored))
    assert metadata.read(domain) == stored


def test_metadata_write_updates(define):
    domain = define(spec(unique("mdw"), meta=record()))
    updated = record(state="ready", ready_seconds=12.5, generation=2,
                     extra={"hardware_hash": "abc"})
    metadata.write(domain, updated)
    assert metadata.read(domain) == updated
    inactive = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<state>ready</state>" in inactive


def test_metadata_write_running(define, conn):
    domain = define(spec(unique("mdr"), meta=record()))
    domain.create()
    metadata.write(domain, record(state="ready"))
    assert metadata.read(domain).state == "ready"
    domain.destroy()
    assert metadata.read(conn.lookupByName(domain.name())).state == "ready"


def test_metadata_absent_is_none(define, conn):
    domain = define(spec(unique("plain")))
    assert metadata.read(domain) is None
    assert metadata.read(conn.lookupByName("test")) is None


def test_metadata_foreign_namespace(define, conn):
    domain = define(spec(unique("foreign")))
    domain.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<x>1</x>", "other",
                       "urn:example:other", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert metadata.read(domain) is None


def test_driver_drops_qemu_args(define):
    with_args = spec(unique("qa"), user_network=UserNetwork("52:54:00:aa:00:01", 22010))
    assert "qemu:commandline" in render_domain(with_args)
    domain = define(with_args)
    root = ET.fromstring(domain.XMLDesc(0))
    assert root.find(f"{QEMU_NS}commandline") is None


# --- MAC and port allocation ----------------------------------------------------------------


KNOWN_MACS = ["52:54:00:11:22:33", "52:54:00:ab:cd:ef", "52:54:00:00:00:02"]


@pytest.fixture
def macs_defined(define):
    for number, mac in enumerate(KNOWN_MACS):
        nic = Interface("network", "default", mac.upper() if number == 1 else mac)
        define(spec(unique("mac"), interfaces=(nic,)))
    return set(KNOWN_MACS)


def test_used_macs_lists_nics(conn, macs_defined):
    found = used_macs(conn)
    assert macs_defined <= found
    assert "aa:bb:cc:dd:ee:ff" in found  # the NIC of the driver's own domain "test"


class ScriptedRandom:
    """A stand-in for SystemRandom that returns ``values`` in order, then counts upward."""

    def __init__(self, values: list[int]):
        self.values = list(values)
        self.next_value = 0

    def randrange(self, stop: int) -> int:
        if self.values:
            return self.values.pop(0)
        self.next_value += 1
        return self.next_value % stop


def test_allocator_skips_used_mac(conn, macs_defined, monkeypatch):
    used_bytes = [0x11, 0x22, 0x33, 0xAB, 0xCD, 0xEF]
    monkeypatch.setattr(allocate.random, "SystemRandom", lambda: ScriptedRandom(used_bytes))
    allocator = HostAllocator(conn)
    mac = allocator.mac()
    assert mac not in macs_defined
    assert mac == "52:54:00:01:02:03"


def test_allocator_macs_distinct(conn, macs_defined):
    allocator = HostAllocator(conn)
    handed_out = [allocator.mac() for _ in range(1000)]
    assert len(set(handed_out)) == 1000
    assert all(mac.startswith("52:54:00:") for mac in handed_out)
    assert not set(handed_out) & macs_defined
    assert all(len(mac) == 17 and mac == mac.lower() for mac in handed_out)


def test_allocator_reserve_mac(conn, monkeypatch):
    monkeypatch.setattr(allocate.random, "SystemRandom",
                        lambda: ScriptedRandom([0x0A, 0x0B, 0x0C]))
    allocator = HostAllocator(conn)
    allocator.reserve_mac("52:54:00:0A:0B:0C")
    assert allocator.mac() == "52:54:00:01:02:03"


def test_allocator_skips_bound_port(conn):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        allocator = HostAllocator(conn, port_range=(port, port + 50))
        first = allocator.ssh_port()
        second = allocator.ssh_port()
    assert first != port
    assert port < first <= port + 50
    assert second != first


def test_allocator_ports_exhausted(conn):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        allocator = HostAllocator(conn, port_range=(port, port))
        with pytest.raises(allocate.ConflictError):
            allocator.ssh_port()


# --- NICs given as QEMU arguments (stub connection) -----------------------------------------


class StubDomain:
    def __init__(self, xml: str):
        self.xml = xml

    def XMLDesc(self, _flags: int = 0) -> str:  # noqa: N802 (libvirt's method name)
        return self.xml


class StubConnection:
    """A connection stub whose domains return the rendered XML, <qemu:commandline> included."""

    def __init__(self, *specs: DomainSpec):
        self.domains = [StubDomain(render_domain(item)) for item in specs]

    def listAllDomains(self, _flags: int = 0) -> list[StubDomain]:  # noqa: N802
        return self.domains


def qemu_arg_conn(first_port: int = 22003) -> StubConnection:
    """Return a stub host whose domains use three MACs and two forward ports in QEMU args."""
    return StubConnection(
        spec("a", user_network=UserNetwork("52:54:00:AA:00:01", first_port)),
        spec("b", interfaces=(Interface("bridge", "br0", "52:54:00:aa:00:02"),),
             extra_qemu_args=("-device", "e1000,netdev=n2,mac=52:54:00:aa:00:03",
                              "-netdev", f"user,id=n2,hostfwd=tcp::{first_port + 1}-:22")),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_used_macs_in_qemu_args():
    assert used_macs(qemu_arg_conn()) == {
        "52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"}


def test_used_ports_in_qemu_args():
    assert used_forward_ports(qemu_arg_conn()) == {22003, 22004}


def test_allocator_skips_arg_mac(monkeypatch):
    monkeypatch.setattr(allocate.random, "SystemRandom",
                        lambda: ScriptedRandom([0xAA, 0x00, 0x01, 0xAA, 0x00, 0x03]))
    assert HostAllocator(qemu_arg_conn()).mac() == "52:54:00:01:02:03"


def test_allocator_skips_arg_port():
    # The forward ports of stopped domains are free on the host, so only the XML scan
    # keeps the allocator off them.
    port = free_port()
    stub = qemu_arg_conn(port)
    allocator = HostAllocator(stub, port_range=(port, port + 50))  # type: ignore[arg-type]
    assert allocator.ssh_port() not in (port, port + 1)


# --- removal --------------------------------------------------------------------------------


def test_remove_transient_desktop(conn):
    """A transient desktop (an instant clone killed before its persist step) is removed
    without an error: destroying it already makes it vanish."""
    name = unique("tr")
    meta = record(inventory="demo", disk="", seed="")
    domain = conn.createXML(render_domain(spec(name, meta=meta)), 0)
    ctx = SimpleNamespace(settings=HostSettings(uri=URI), conn=conn)
    seen: list[tuple[str, str, str]] = []
    try:
        remove_desktop(ctx, domain, "demo", lambda *event: seen.append(event))
    finally:
        if name in {d.name() for d in conn.listAllDomains(0)}:
            conn.lookupByName(name).destroy()
    assert name not in {d.name() for d in conn.listAllDomains(0)}
    assert seen[-1] == (name, "remove", "done"), seen


def test_delete_of_vanished_desktop(conn):
    """apply's deletion of a desktop removed since the plan was made succeeds quietly
    (a libvirt error here would fail the whole apply or controller pass)."""
    plan = SimpleNamespace(hosts={"local": SimpleNamespace(conn=conn)},
                           inventory=SimpleNamespace(name="demo"))
    seen: list[tuple[str, str, str]] = []
    apply._delete(plan, Action("delete", unique("gone"), "p", "local"),
                  lambda *event: seen.append(event))
    assert seen == [], "nothing was there to remove"
