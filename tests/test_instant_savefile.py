"""Instant clones by restore: save image parsing, child headers, XML retargeting, restores.

The first tests use synthetic save images and domain XML (no libvirt). The libvirt
tests boot one tiny parent VM per xdist worker (direct kernel boot, TCG, 128 MiB, no
NIC), save it, and restore children from its save image through a FIFO. Each child
has its own overlay backed by the parent's overlay.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from conftest import TEST_POOL, TEST_POOL_PATH

from orchestrator.domain import DirectBoot, Disk, DiskLayer, DomainSpec, render_domain
from orchestrator.errors import ConflictError, HostError, ImageError, LabctlError
from orchestrator.guest import agent
from orchestrator.instant import savefile
from orchestrator.state import metadata
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import pool as volumes
from orchestrator.storage import replica

COOKIE = "<cookie>\n  <cpu mode='custom'/>\n</cookie>\n"
STREAM = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 64


def parent_xml(*, genid: bool = True) -> str:
    """A saved parent's domain XML as libvirt 9.0 writes it, with two disks."""
    genid_line = "<genid>52c183d5-ce23-4cb5-8168-4494c5d6da7c</genid>" if genid else ""
    return f"""<domain type='qemu' id='7' xmlns:qemu='{savefile.QEMU_NAMESPACE}'>
  <name>parent</name>
  <uuid>adf05a54-a34e-40e8-8ad4-bfbac4a01ec2</uuid>
  {genid_line}
  <title>parent title</title>
  <metadata>
    <labctl:parent xmlns:labctl='urn:labctl:parent:1'><pool>p</pool></labctl:parent>
    <other:app xmlns:other='urn:example:other'>kept</other:app>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/pool/parent.qcow2' index='2'/>
      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/pool/replica.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/pool/data.raw'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </disk>
    <serial type='pty'>
      <log file='/logs/parent.log' append='off'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <console type='pty'>
      <log file='/logs/parent.log' append='off'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-no-user-config'/>
  </qemu:commandline>
</domain>
"""


def build_image(path: Path, *, xml: str | None = None, cookie: str = COOKIE,
                magic: bytes = savefile.MAGIC, version: int = 2, compressed: int = 0,
                padding: int = savefile.LIBVIRT_PADDING, stream: bytes = STREAM,
                data_len: int | None = None, cookie_offset: int | None = None) -> Path:
    """Write a save image laid out as libvirt writes one; keyword arguments corrupt it."""
    xml_bytes = (parent_xml() if xml is None else xml).encode() + b"\0"
    cookie_bytes = cookie.encode() + b"\0" if cookie else b""
    data = xml_bytes + cookie_bytes + bytes(padding)
    if cookie_offset is None:
        cookie_offset = len(xml_bytes) if cookie else 0
    header = struct.pack("<16s5I56x", magic, version,
                         len(data) if data_len is None else data_len, 1, compressed,
                         cookie_offset)
    path.write_bytes(header + data + stream)
    return path


# Header parsing.


def test_read_parses_header(tmp_path):
    path = build_image(tmp_path / "parent.save")
    image = savefile.read_save_image(str(path))
    xml_len = len(parent_xml().encode()) + 1
    assert image.version == 2
    assert image.xml == parent_xml()
    assert image.cookie == COOKIE
    assert image.was_running is True
    assert image.compressed == 0
    assert image.stream_offset == 92 + xml_len + len(COOKIE) + 1 + savefile.LIBVIRT_PADDING
    assert image.size == path.stat().st_size
    assert path.read_bytes()[image.stream_offset:] == STREAM


def test_read_without_cookie(tmp_path):
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save", cookie="")))
    assert image.cookie == ""
    assert image.xml == parent_xml()


def test_read_missing_file(tmp_path):
    with pytest.raises(ImageError) as caught:
        savefile.read_save_image(str(tmp_path / "absent.save"))
    assert "not found" in caught.value.message
    assert caught.value.where == str(tmp_path / "absent.save")
    assert "save the parent" in caught.value.fix


CORRUPTIONS = {
    "bad magic": ({"magic": b"NotASaveImage123"}, "magic is b'NotASaveImage123'"),
    "incomplete save": ({"magic": savefile.PARTIAL_MAGIC}, "incomplete"),
    "newer version": ({"version": 3}, "version 3 is not supported"),
    "other byte order": ({"version": 2 << 24}, "other byte order"),
    "compressed": ({"compressed": 4}, "compressed"),
    "data past end": ({"data_len": 1 << 30}, "does not fit"),
    "zero data length": ({"data_len": 0}, "does not fit"),
    "cookie past data": ({"cookie_offset": 1 << 20}, "cookie offset"),
    "no stream": ({"stream": b""}, "does not fit"),
    "stream magic": ({"stream": b"XXXX" + STREAM[4:]}, "no QEMU migration stream"),
    "no NUL": ({"cookie": "", "data_len": 10}, "no terminating NUL"),
    "not a domain": ({"xml": "<network/>"}, "expected <domain>"),
    "not XML": ({"xml": "<domain"}, "not valid XML"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_read_rejects_corrupt(tmp_path, case):
    changes, expected = CORRUPTIONS[case]
    path = build_image(tmp_path / "bad.save", **changes)
    with pytest.raises(ImageError) as caught:
        savefile.read_save_image(str(path))
    assert expected in caught.value.message, caught.value.message
    assert caught.value.where == str(path)
    assert caught.value.fix, f"no fix offered for {case}"


def test_read_truncated_header(tmp_path):
    path = tmp_path / "short.save"
    path.write_bytes(savefile.MAGIC + b"\x02\x00")
    with pytest.raises(ImageError, match="shorter than the 92-byte header"):
        savefile.read_save_image(str(path))


def test_compressed_fix_names_setting(tmp_path):
    path = build_image(tmp_path / "lzop.save", compressed=4)
    with pytest.raises(ImageError) as caught:
        savefile.read_save_image(str(path))
    assert 'save_image_format = "raw"' in caught.value.fix


# Child headers.


def write_child(tmp_path: Path, image: savefile.SaveImage, xml: str) -> Path:
    """Write a child image (new header, the parent's stream) as the FIFO would carry it."""
    stream = Path(image.path).read_bytes()[image.stream_offset:]
    path = tmp_path / "child.save"
    path.write_bytes(savefile.child_header(image, xml) + stream)
    return path


def test_child_header_roundtrip(tmp_path):
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save")))
    child_xml = parent_xml().replace("<name>parent</name>", "<name>child-with-longer-name</name>")
    child = savefile.read_save_image(str(write_child(tmp_path, image, child_xml)))
    assert child.xml == child_xml
    assert child.cookie == image.cookie
    assert child.was_running == image.was_running
    assert child.stream_offset == image.stream_offset, "a fitting XML must keep the offset"
    assert child.size == image.size


def test_child_header_grows_data(tmp_path):
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save", padding=16)))
    long_xml = parent_xml().replace("parent title", "t" * 1000)
    child = savefile.read_save_image(str(write_child(tmp_path, image, long_xml)))
    assert child.xml == long_xml
    assert child.cookie == COOKIE
    assert child.stream_offset == 92 + len(long_xml.encode()) + 1 + len(COOKIE) + 1
    assert Path(child.path).read_bytes()[child.stream_offset:] == STREAM


def test_child_header_without_cookie(tmp_path):
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save", cookie="")))
    header = savefile.child_header(image, "<domain><name>c</name></domain>")
    assert struct.unpack_from("<I", header, 32)[0] == 0, "cookieOffset must stay 0"
    assert len(header) == image.stream_offset


def test_child_header_field_layout(tmp_path):
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save")))
    header = savefile.child_header(image, parent_xml())
    assert header[:16] == b"LibvirtQemudSave"
    version, data_len, was_running, compressed, cookie_offset = struct.unpack_from(
        "<5I", header, 16)
    assert (version, was_running, compressed) == (2, 1, 0)
    assert data_len == image.stream_offset - 92
    assert cookie_offset == len(parent_xml().encode()) + 1
    assert header[36:92] == bytes(56)


# Retargeting the domain XML.


def child_record(index: int = 3, inventory: str = "inv") -> DesktopRecord:
    return DesktopRecord(
        inventory=inventory, pool="kids", index=index, clone="instant", image="tiny@1",
        host="local", hostname=f"kid-{index}", fqdn="", machine_id="", mac="", disk="",
    )


CHILD_DISK = Disk(
    path="/pool/child.qcow2", format="qcow2", target="vda",
    backing=(DiskLayer("/pool/parent.qcow2", "qcow2"), DiskLayer("/pool/replica.raw", "raw")),
)


def find_disk(root: ET.Element, target: str) -> ET.Element:
    matches = [disk for disk in root.iterfind("devices/disk")
               if disk.find("target").get("dev") == target]
    assert len(matches) == 1, f"expected one disk with target {target}, found {len(matches)}"
    return matches[0]


def retarget(xml: str | None = None, **changes) -> ET.Element:
    arguments = dict(
        name="kid-3", uuid="11111111-2222-3333-4444-555555555555", title="Kid 3",
        genid="99999999-8888-7777-6666-555555555555", metadata_xml=metadata.to_xml(child_record()),
        disks={"vda": CHILD_DISK}, console_log="/logs/kid-3.log",
    )
    arguments.update(changes)
    return ET.fromstring(savefile.retarget_xml(parent_xml() if xml is None else xml,
                                               **arguments))


def test_retarget_identity():
    root = retarget()
    assert root.findtext("name") == "kid-3"
    assert root.findtext("uuid") == "11111111-2222-3333-4444-555555555555"
    assert root.findtext("title") == "Kid 3"
    assert root.findtext("genid") == "99999999-8888-7777-6666-555555555555"
    assert "id" not in root.attrib
    assert root.get("type") == "qemu"


def test_retarget_tcg_cache():
    xml = parent_xml().replace(
        "</devices>", "</devices><features><tcg><tb-cache unit='MiB'>256</tb-cache></tcg>"
        "</features>")
    assert retarget(xml).findtext("features/tcg/tb-cache") == "256", "0 must keep the parent's"
    cache = retarget(xml, tcg_cache_mib=64).find("features/tcg/tb-cache")
    assert cache.text == "64"
    assert cache.get("unit") == "MiB"
    assert retarget(tcg_cache_mib=64).find("features/tcg") is None, "a KVM domain has none"


def test_retarget_without_genid():
    root = retarget(parent_xml(genid=False))
    assert root.find("genid") is None, "a genid must not appear where the parent had none"


def test_retarget_title_added_after_uuid():
    xml = parent_xml(genid=False).replace("<title>parent title</title>", "")
    tags = [child.tag for child in retarget(xml)]
    assert tags.index("title") == tags.index("uuid") + 1


def test_retarget_metadata_replaced():
    container = retarget().find("metadata")
    tags = [child.tag for child in container]
    assert "{urn:labctl:parent:1}parent" not in tags, "the parent's record must go"
    assert "{urn:example:other}app" in tags, "other programs' metadata must stay"
    records = container.findall(f"{{{metadata.NAMESPACE}}}desktop")
    assert len(records) == 1
    record = metadata.from_xml(ET.tostring(records[0], encoding="unicode"))
    assert record.index == 3
    assert record.clone == "instant"


def test_retarget_metadata_prefix():
    xml = savefile.retarget_xml(
        parent_xml(), name="k", uuid="u", title="", genid="g",
        metadata_xml=metadata.to_xml(child_record()), disks={}, console_log="")
    assert "labctl:desktop" in xml, "the labctl prefix keeps the XML readable"
    assert "qemu:commandline" in xml


def test_retarget_metadata_wrong_namespace():
    with pytest.raises(LabctlError, match="not in namespace urn:labctl:desktop:1"):
        retarget(metadata_xml="<desktop xmlns='urn:other'/>")


def test_retarget_disk_chain():
    root = retarget()
    vda = find_disk(root, "vda")
    assert vda.find("source").attrib == {"file": "/pool/child.qcow2"}
    assert vda.find("driver").get("type") == "qcow2"
    assert vda.find("driver").get("discard") == "unmap", "other driver options must stay"
    chain = vda.findall("backingStore")
    assert len(chain) == 1
    first = chain[0]
    assert first.find("format").get("type") == "qcow2"
    assert first.find("source").get("file") == "/pool/parent.qcow2"
    second = first.find("backingStore")
    assert second.find("format").get("type") == "raw"
    assert second.find("source").get("file") == "/pool/replica.raw"
    end = second.find("backingStore")
    assert end is not None, "the chain must end in an empty <backingStore/>"
    assert len(end) == 0
    assert not end.attrib
    children = [child.tag for child in vda]
    assert children.index("backingStore") == children.index("source") + 1


def test_retarget_keeps_devices():
    root = retarget()
    vda = find_disk(root, "vda")
    assert vda.find("alias").get("name") == "virtio-disk0"
    assert vda.find("address").get("slot") == "0x03"
    vdb = find_disk(root, "vdb")
    assert vdb.find("source").get("file") == "/pool/data.raw", "disks not named must stay"
    assert vdb.find("readonly") is not None
    assert root.find("memory").text == "131072"


def test_retarget_readonly_toggled():
    writable = Disk("/pool/data-child.raw", "raw", "vdb")
    vdb = find_disk(retarget(disks={"vdb": writable}), "vdb")
    assert vdb.find("readonly") is None
    readonly = Disk("/pool/child.qcow2", "qcow2", "vda", readonly=True)
    vda = find_disk(retarget(disks={"vda": readonly}), "vda")
    assert vda.find("readonly") is not None
    assert len(vda.find("backingStore")) == 0, "an empty chain ends in <backingStore/>"


def test_retarget_unknown_disk():
    with pytest.raises(ImageError, match="no disk with target vdz"):
        retarget(disks={"vdz": Disk("/pool/x.qcow2", "qcow2", "vdz")})


def test_retarget_disk_target_mismatch():
    with pytest.raises(LabctlError, match="has target vdb but is given for vda"):
        retarget(disks={"vda": Disk("/pool/x.qcow2", "qcow2", "vdb")})


def test_retarget_console_log():
    root = retarget()
    for device in ("serial", "console"):
        element = root.find(f"devices/{device}/log")
        assert element.get("file") == "/logs/kid-3.log", device
        assert element.get("append") == "off", device


def test_retarget_console_log_removed():
    root = retarget(console_log="")
    assert root.find("devices/serial/log") is None
    assert root.find("devices/console/log") is None


def test_retarget_invalid_parent_xml():
    with pytest.raises(LabctlError, match="not valid XML"):
        retarget("<domain>")


# The FIFO writer, without libvirt.


def make_fifo(tmp_path: Path) -> str:
    path = str(tmp_path / "child.fifo")
    os.mkfifo(path, 0o600)
    return path


def test_fifo_mode(tmp_path):
    path = savefile._make_fifo(str(tmp_path), "kid")
    assert stat.S_ISFIFO(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.basename(path).startswith(".labctl-restore-kid-")
    assert savefile._make_fifo(str(tmp_path), "kid") != path, "FIFO names must be unique"


def test_writer_streams_child(tmp_path):
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save")))
    header = savefile.child_header(image, parent_xml())
    fifo = make_fifo(tmp_path)
    writer = savefile._StreamWriter(fifo, header, image, timeout=10)
    writer.start()
    with open(fifo, "rb") as reader:
        received = reader.read()
    writer.join(10)
    assert not writer.is_alive()
    assert writer.error is None
    assert writer.done
    assert received == header + STREAM


def test_writer_timeout_frees_late_reader(tmp_path):
    """A reader that opens after the writer gave up gets an error, not a hang."""
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save")))
    fifo = make_fifo(tmp_path)
    writer = savefile._StreamWriter(fifo, b"header", image, timeout=0.2)
    writer.start()
    writer.join(5)
    assert isinstance(writer.error, TimeoutError)
    assert not os.path.exists(fifo), "the writer must unlink a FIFO nobody opened"


def test_writer_timeout_frees_waiting_reader(tmp_path):
    """A reader blocked in open() when the writer gives up gets EOF."""
    image = savefile.read_save_image(str(build_image(tmp_path / "p.save")))
    fifo = make_fifo(tmp_path)
    received: list[bytes] = []

    def read_blocking() -> None:
        with open(fifo, "rb") as reader:
            received.append(reader.read())

    reader = threading.Thread(target=read_blocking, daemon=True)
    reader.start()
    time.sleep(0.1)
    writer = savefile._StreamWriter(fifo, b"", image, timeout=0)
    writer.start()
    writer.join(5)
    reader.join(5)
    assert not reader.is_alive(), "the reader still hangs in open() or read()"
    assert received == [b""]


# Restores through libvirt.

AGENT_TIMEOUT = 60
RESTORE_TIMEOUT = 60
MEMORY_KIB = 128 * 1024


@dataclass
class Parent:
    """A saved tiny parent VM: its save image, overlay and what its memory contained."""

    image: savefile.SaveImage
    overlay: DiskLayer
    replica: replica.Replica
    machine_id: str
    token: str
    prefix: str
    workdir: Path


@pytest.fixture(scope="module")
def test_pool(conn) -> libvirt.virStoragePool:
    return volumes.ensure_pool(conn, TEST_POOL, TEST_POOL_PATH)


@pytest.fixture(scope="module")
def parent(conn, tiny_image, test_pool, tmp_path_factory) -> Parent:
    """Boot the tiny image as a parent VM, write a token into its RAM and save it."""
    with replica.replica_lock(test_pool, tiny_image.version):
        base = replica.ensure_replica(test_pool, tiny_image)
    prefix = f"labctl-t-sf{secrets.token_hex(3)}"
    workdir = tmp_path_factory.mktemp("savefile")
    overlay_name = f"{prefix}-parent.qcow2"
    save_path = workdir / "parent.save"
    try:
        volume = volumes.create_overlay(test_pool, overlay_name, base.disk,
                                        tiny_image.virtual_size)
        overlay = DiskLayer(volume.path(), "qcow2")
        spec = DomainSpec(
            name=f"{prefix}-parent", uuid=str(uuid.uuid4()), domain_type="qemu",
            memory_kib=MEMORY_KIB, vcpus=1, genid=str(uuid.uuid4()),
            disks=(Disk(overlay.path, "qcow2", "vda", (base.disk,)),),
            metadata_xml=metadata.to_xml(child_record(0, prefix)),
            boot=DirectBoot(base.kernel, base.initrd, tiny_image.boot.cmdline),
            console_log=str(workdir / "parent.log"),
        )
        domain = conn.createXML(render_domain(spec), 0)
        agent.wait_for_agent(domain, timeout=AGENT_TIMEOUT)
        machine_id = agent.check_output(domain, ["cat", "/etc/machine-id"]).strip()
        token = secrets.token_hex(8)
        agent.check_output(domain, ["sh", "-c", f"echo {token} > /fork-token"])
        domain.save(str(save_path))
        yield Parent(savefile.read_save_image(str(save_path)), overlay, base, machine_id,
                     token, prefix, workdir)
    finally:
        destroy_domain(conn, f"{prefix}-parent")
        volumes.delete(test_pool, overlay_name)
        save_path.unlink(missing_ok=True)


def destroy_domain(conn: libvirt.virConnect, name: str) -> None:
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    domain.destroy()


@pytest.fixture
def children(conn, parent, test_pool, tiny_image):
    """Return a function that makes a child's overlay and XML; removes them all after."""
    names: list[str] = []

    def make(suffix: str) -> tuple[str, str, str]:
        name = f"{parent.prefix}-{suffix}"
        names.append(name)
        volume = volumes.create_overlay(test_pool, f"{name}.qcow2", parent.overlay,
                                        tiny_image.virtual_size)
        disk = Disk(volume.path(), "qcow2", "vda", (parent.overlay, parent.replica.disk))
        child_uuid = str(uuid.uuid4())
        xml = savefile.retarget_xml(
            parent.image.xml, name=name, uuid=child_uuid, title=f"child {suffix}",
            genid=str(uuid.uuid4()),
            metadata_xml=metadata.to_xml(child_record(len(names), parent.prefix)),
            disks={"vda": disk}, console_log=str(parent.workdir / f"{name}.log"),
        )
        return name, child_uuid, xml

    yield make
    for name in names:
        destroy_domain(conn, name)
        volumes.delete(test_pool, f"{name}.qcow2")


def fifo_dir(parent: Parent, name: str) -> Path:
    path = parent.workdir / f"fifo-{name}"
    path.mkdir()
    return path


def disk_source(domain: libvirt.virDomain, target: str) -> str:
    root = ET.fromstring(domain.XMLDesc(0))
    return find_disk(root, target).find("source").get("file")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_absent(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    return False


@pytest.mark.libvirt
def test_real_image_header(parent):
    image = parent.image
    assert image.version == 2
    assert image.was_running
    assert image.compressed == 0
    assert f"<name>{parent.prefix}-parent</name>" in image.xml
    assert image.cookie.startswith("<cookie>")
    with open(image.path, "rb") as handle:
        handle.seek(image.stream_offset)
        assert handle.read(4) == b"QEVM"
    assert image.size > MEMORY_KIB * 1024 // 4, "the stream should hold the guest's RAM"


@pytest.mark.libvirt
def test_real_image_corrupt_header(parent, tmp_path):
    with open(parent.image.path, "rb") as handle:
        head = bytearray(handle.read(parent.image.stream_offset + 4096))
    head[0:16] = b"LibvirtQemudXXXX"
    corrupt = tmp_path / "corrupt.save"
    corrupt.write_bytes(head)
    with pytest.raises(ImageError) as caught:
        savefile.read_save_image(str(corrupt))
    assert "not a libvirt QEMU save image" in caught.value.message
    assert caught.value.where == str(corrupt)


@pytest.mark.libvirt
def test_restore_two_children(conn, parent, children):
    before = sha256(parent.image.path)
    requests = [children("c1"), children("c2")]
    workdirs = [fifo_dir(parent, name) for name, _, _ in requests]

    def restore(index: int) -> libvirt.virDomain:
        _name, _uuid, xml = requests[index]
        return savefile.restore_child(conn, parent.image, xml, workdir=str(workdirs[index]),
                                      timeout=RESTORE_TIMEOUT)

    with ThreadPoolExecutor(max_workers=2) as pool:
        domains = list(pool.map(restore, range(2)))

    for index, domain in enumerate(domains):
        name, child_uuid, _ = requests[index]
        assert domain.name() == name
        assert domain.UUIDString() == child_uuid
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING, f"{name} is not running"
        assert disk_source(domain, "vda") == f"{TEST_POOL_PATH}/{name}.qcow2"
        assert metadata.read(domain).index == index + 1
        assert list(workdirs[index].iterdir()) == [], f"the FIFO of {name} was left behind"
        agent.wait_for_agent(domain, timeout=AGENT_TIMEOUT)
        machine_id = agent.check_output(domain, ["cat", "/etc/machine-id"]).strip()
        assert machine_id == parent.machine_id, f"{name} booted instead of resuming"
        token = agent.check_output(domain, ["cat", "/fork-token"]).strip()
        assert token == parent.token, f"{name} lacks the token written into the parent's RAM"
    assert domains[0].UUIDString() != domains[1].UUIDString()
    assert sha256(parent.image.path) == before, "a restore changed the parent's save image"


@pytest.mark.libvirt
def test_restore_rejected_leaves_nothing(conn, parent, children):
    name, _, xml = children("bad")
    missing = f"{TEST_POOL_PATH}/{parent.prefix}-missing.qcow2"
    xml = savefile.retarget_xml(
        xml, name=name, uuid=str(uuid.uuid4()), title="", genid=str(uuid.uuid4()),
        metadata_xml=metadata.to_xml(child_record(9, parent.prefix)),
        disks={"vda": Disk(missing, "qcow2", "vda", (parent.overlay, parent.replica.disk))},
        console_log="",
    )
    workdir = fifo_dir(parent, name)
    with pytest.raises(HostError) as caught:
        savefile.restore_child(conn, parent.image, xml, workdir=str(workdir),
                               timeout=RESTORE_TIMEOUT)
    assert name in caught.value.message
    assert missing in caught.value.message, "libvirt's message about the disk is missing"
    assert is_absent(conn, name), f"the failed restore left domain {name}"
    assert list(workdir.iterdir()) == [], "the failed restore left its FIFO"


@pytest.mark.libvirt
def test_restore_timeout_fails_cleanly(conn, parent, children):
    name, _, xml = children("late")
    workdir = fifo_dir(parent, name)
    started = time.monotonic()
    with pytest.raises(HostError) as caught:
        savefile.restore_child(conn, parent.image, xml, workdir=str(workdir), timeout=0)
    assert time.monotonic() - started < RESTORE_TIMEOUT
    assert "timed out after 0 s" in caught.value.message
    assert "timeout" in caught.value.fix
    assert is_absent(conn, name)
    assert list(workdir.iterdir()) == []


@pytest.mark.libvirt
def test_restore_existing_name_conflict(conn, parent, children):
    name, _, xml = children("dup")
    workdir = fifo_dir(parent, name)
    first = savefile.restore_child(conn, parent.image, xml, workdir=str(workdir),
                                   timeout=RESTORE_TIMEOUT)
    with pytest.raises(ConflictError, match="already exists"):
        savefile.restore_child(conn, parent.image, xml, workdir=str(workdir),
                               timeout=RESTORE_TIMEOUT)
    assert first.isActive(), "the conflicting restore touched the running child"
    assert list(workdir.iterdir()) == []


