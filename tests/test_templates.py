"""Tests of the renderers: golden files, libvirt's schemas, hostile values and fuzzing.

Golden files live in tests/golden/. After an intended template change, rewrite them
with ``LABCTL_UPDATE_GOLDEN=1 pytest tests/test_templates.py`` and review the diff.
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import render
from orchestrator.domain import (
    DirectBoot, Disk, DiskLayer, DomainSpec, Interface, UserNetwork, render_domain,
)
from orchestrator.identity.desktop import DesktopIdentity, UserAccount, build_seed
from orchestrator.identity.keys import KeyPair
from orchestrator.state import metadata
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage.pool import volume_xml

GOLDEN = Path(__file__).resolve().parent / "golden"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
LABCTL_NS = "{urn:labctl:desktop:1}"
POOL_DIR = "/var/lib/labctl/pool"

# The bootcmd script of user-data.j2, as YAML loads it (single quotes keep the backslash).
MACHINE_ID_SCRIPT = (
    'test "$(cat /etc/machine-id 2>/dev/null)" = "$1" || '
    'printf "%s\\n" "$1" > /etc/machine-id'
)

# Values that would break a naive template: markup, quoting, template syntax, shell,
# path traversal, YAML syntax, line breaks, C1 controls, non-BMP text and sheer length.
HOSTILE = [
    "<b>bold</b> & <i>",
    "\"double\" 'single'",
    "line one\nline two",
    "cr\r\nlf\ttab\rlone cr",
    "]]><!-- -->",
    "<![CDATA[x]]>",
    "&amp; &#60; &lt;",
    "{{ name }} {% if x %}{# c #}",
    "$(reboot)",
    "`reboot`; rm -rf /",
    "../../../etc/passwd",
    "a: b",
    "- x",
    "!!python/object/apply:os.system ['reboot']",
    "# not a comment",
    "key: value\nother: injected",
    "[1, 2]",
    "{a: 1}",
    "*alias &anchor",
    "null",
    "yes",
    " leading and trailing ",
    "\x7f\x85\x9f\u2028\u2029",
    "caf\u00e9 \u65e5\u672c \U0001f600",
    "x" * 5000,
]

# Characters XML 1.0 allows (no surrogates, no U+FFFE/U+FFFF, controls only \t \n \r),
# with the ones templates mishandle most often drawn more often.
XML_CHARS = st.one_of(
    st.sampled_from(list("\t\n\r\x7f\x85\x9f\u2028<>&\"'[]{}%$;:-!#*|`\\/")),
    st.characters(min_codepoint=0x20, max_codepoint=0xD7FF),
    st.characters(min_codepoint=0xE000, max_codepoint=0xFFFD),
    st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
)
XML_TEXT = st.one_of(st.text(alphabet=XML_CHARS, max_size=40), st.sampled_from(HOSTILE))
YAML_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE))
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# --- fixed inputs ---------------------------------------------------------------------------

ACCESS_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFIXEDTESTACCESSKEYdemo0000000000000 labctl-demo"
STUDENT_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFIXEDTESTSTUDENTKEY000000000000000 student@pc"
HOST_KEY = KeyPair(
    private="-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "VEVTVC1PTkxZLU5PVC1BLVJFQUwtS0VZLWxhYi1sMQ==\n"
    "-----END OPENSSH PRIVATE KEY-----\n",
    public="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFIXEDTESTHOSTKEYlabl10000000000000000 root@lab-l1",
)


def fixed_identity(**changes: object) -> DesktopIdentity:
    """Return the identity behind the golden seed files; ``changes`` replace fields."""
    identity = DesktopIdentity(
        name="lab-l1",
        hostname="lab-l1",
        fqdn="lab-l1.lab.test",
        uuid="5d6f0a52-8c1e-4b7a-9f3d-2e4c6b8a1f07",
        genid="b3e1c2d4-7a6f-4e5d-8c9b-0a1f2e3d4c5b",
        mac="52:54:00:3a:7c:01",
        generation=1,
        ssh_host_key=HOST_KEY,
        users=(
            UserAccount("student", (STUDENT_KEY, ACCESS_KEY), sudo=True),
            UserAccount("teacher", (ACCESS_KEY,), password_hash="$6$fixedsalt$Zm9vYmFy",
                        shell="/bin/sh"),
        ),
        timezone="Etc/UTC",
        run_once=("touch /var/lib/labctl-first-boot", "systemctl restart ssh"),
        root_authorized_keys=(ACCESS_KEY,),
    )
    return replace(identity, **changes)


def fixed_record(**changes: object) -> DesktopRecord:
    record = DesktopRecord(
        inventory="demo", pool="linked", index=1, clone="linked", image="debian12@3f9c1a2b4c5d",
        host="local", hostname="lab-l1", fqdn="lab-l1.lab.test",
        machine_id="5d6f0a528c1e4b7a9f3d2e4c6b8a1f07", mac="52:54:00:3a:7c:01",
        disk=f"{POOL_DIR}/labctl-lab-l1-os.qcow2", seed=f"{POOL_DIR}/labctl-lab-l1-seed.iso",
        network="lab", ssh_port=22001, generation=1, state="provisioning",
        created="2024-05-01T12:00:00+00:00", config_hash="0123456789ab", user="student",
        extra={"login_user": "student", "network_mode": "user"},
    )
    return replace(record, **changes)


def seed_disk(name: str) -> Disk:
    return Disk(f"{POOL_DIR}/labctl-{name}-seed.iso", "raw", "vdb", readonly=True,
                serial="labctl-seed")


def linked_spec() -> DomainSpec:
    """A linked clone: direct kernel boot, QEMU user networking, a 2-layer backing chain."""
    chain = (
        DiskLayer(f"{POOL_DIR}/labctl-replica-debian12-3f9c1a2b4c5d.qcow2", "qcow2"),
        DiskLayer(f"{POOL_DIR}/labctl-base-debian12.raw", "raw"),
    )
    return DomainSpec(
        name="lab-l1",
        uuid="5d6f0a52-8c1e-4b7a-9f3d-2e4c6b8a1f07",
        genid="b3e1c2d4-7a6f-4e5d-8c9b-0a1f2e3d4c5b",
        title="linked desktop 1 (demo)",
        domain_type="qemu",
        memory_kib=524288,
        vcpus=1,
        disks=(Disk(f"{POOL_DIR}/labctl-lab-l1-os.qcow2", "qcow2", "vda", backing=chain),
               seed_disk("lab-l1")),
        metadata_xml=metadata.to_xml(fixed_record()),
        boot=DirectBoot(f"{POOL_DIR}/labctl-replica-debian12-3f9c1a2b4c5d.kernel",
                        f"{POOL_DIR}/labctl-replica-debian12-3f9c1a2b4c5d.initrd",
                        "root=/dev/vda rw console=ttyS0 quiet"),
        user_network=UserNetwork("52:54:00:3a:7c:01", 22001),
        console_log="/var/log/libvirt/qemu/lab-l1-console.log",
        emulator="/usr/bin/qemu-system-x86_64",
        tcg_cache_mib=256,
    )


def full_spec() -> DomainSpec:
    """A full clone: firmware boot, a NIC on a libvirt network, no guest agent, KVM."""
    record = fixed_record(pool="full", clone="full", hostname="lab-f1",
                          fqdn="lab-f1.lab.test", mac="52:54:00:3a:7c:02",
                          disk=f"{POOL_DIR}/labctl-lab-f1-os.qcow2",
                          seed=f"{POOL_DIR}/labctl-lab-f1-seed.iso", ssh_port=0,
                          extra={"network_mode": "network"})
    return DomainSpec(
        name="lab-f1",
        uuid="0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
        genid="9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d",
        title="full desktop 1 (demo)",
        domain_type="kvm",
        memory_kib=2097152,
        vcpus=2,
        disks=(Disk(f"{POOL_DIR}/labctl-lab-f1-os.qcow2", "qcow2", "vda"), seed_disk("lab-f1")),
        metadata_xml=metadata.to_xml(record),
        interfaces=(Interface("network", "labnet", "52:54:00:3a:7c:02"),),
        console_log="/var/log/libvirt/qemu/lab-f1-console.log",
        agent=False,
        emulator="/usr/bin/qemu-system-x86_64",
    )


def overlay_volume() -> str:
    return volume_xml("labctl-lab-l1-os.qcow2", 4 << 30, "qcow2", allocation=0,
                      backing=DiskLayer(f"{POOL_DIR}/labctl-replica-debian12.qcow2", "qcow2"))


def pool_xml(name: str = "labctl", path: str = POOL_DIR) -> str:
    return render.render("pool.xml.j2", name=name, path=path)


def seed_files() -> dict[str, str]:
    return {item.path: item.data.decode() for item in build_seed(fixed_identity()).files}


def user_data_context(**changes: object) -> dict[str, object]:
    """Return a context for the cloud-init templates, as build_seed builds it."""
    context: dict[str, object] = {
        "hostname": "lab-l1",
        "fqdn": "lab-l1.lab.test",
        "machine_id": "5d6f0a528c1e4b7a9f3d2e4c6b8a1f07",
        "instance_id": "lab-l1-5d6f0a52-g1",
        "ssh_host_key": HOST_KEY,
        "timezone": "Etc/UTC",
        "users": [{"name": "student", "shell": "/bin/bash", "password_hash": "",
                   "sudo": True, "ssh_authorized_keys": [ACCESS_KEY]}],
        "password_login": False,
        "run_once": ["true"],
    }
    context.update(changes)
    return context


def expected_user_data(context: dict[str, object]) -> dict[str, object]:
    """Return the document user-data.j2 must produce for ``context``, key for key."""
    key: KeyPair = context["ssh_host_key"]  # type: ignore[assignment]
    document: dict[str, object] = {
        "hostname": context["hostname"],
        "fqdn": context["fqdn"],
        "prefer_fqdn_over_hostname": False,
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "disable_root": True,
        "ssh_pwauth": context["password_login"],
        "ssh_deletekeys": True,
        "ssh_keys": {"ed25519_private": key.private, "ed25519_public": key.public},
    }
    if context["timezone"]:
        document["timezone"] = context["timezone"]
    document["users"] = [expected_user(user) for user in context["users"]]  # type: ignore[attr-defined]
    document["bootcmd"] = [["sh", "-c", MACHINE_ID_SCRIPT, "labctl-machine-id",
                            context["machine_id"]]]
    if context["run_once"]:
        document["runcmd"] = context["run_once"]
    return document


def expected_user(user: dict[str, object]) -> dict[str, object]:
    entry: dict[str, object] = {"name": user["name"], "shell": user["shell"]}
    if user["password_hash"]:
        entry["lock_passwd"] = False
        entry["passwd"] = user["password_hash"]
    else:
        entry["lock_passwd"] = True
    if user["sudo"]:
        entry["sudo"] = "ALL=(ALL) NOPASSWD:ALL"
    entry["ssh_authorized_keys"] = user["ssh_authorized_keys"]
    return entry


# --- golden files ---------------------------------------------------------------------------


def check_golden(name: str, text: str, directory: Path = GOLDEN) -> None:
    """Compare ``text`` with tests/golden/NAME, or rewrite it when LABCTL_UPDATE_GOLDEN=1."""
    path = directory / name
    if os.environ.get("LABCTL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"tests/golden/{name} is missing; create it with LABCTL_UPDATE_GOLDEN=1",
                    pytrace=False)
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile=f"tests/golden/{name}", tofile="rendered",
        ))
        pytest.fail(f"rendered output differs from tests/golden/{name} "
                    f"(rewrite with LABCTL_UPDATE_GOLDEN=1 if intended):\n{diff}", pytrace=False)


def test_golden_domain_linked():
    check_golden("domain-linked.xml", render_domain(linked_spec()))


def test_tcg_cache_only_under_tcg():
    tcg = ET.fromstring(render_domain(linked_spec()))
    assert tcg.findtext("features/tcg/tb-cache") == "256"
    assert tcg.find("features/tcg/tb-cache").get("unit") == "MiB"
    kvm = ET.fromstring(render_domain(replace(full_spec(), tcg_cache_mib=256)))
    assert kvm.find("features/tcg") is None, "a KVM domain must not get a TCG cache size"
    default = ET.fromstring(render_domain(replace(linked_spec(), tcg_cache_mib=0)))
    assert default.find("features/tcg") is None, "0 must keep QEMU's default cache"


def test_golden_domain_full():
    check_golden("domain-full.xml", render_domain(full_spec()))


def test_golden_volume_overlay():
    check_golden("volume-overlay.xml", overlay_volume())


def test_golden_pool():
    check_golden("pool.xml", pool_xml())


@pytest.mark.parametrize("name", ["meta-data", "user-data", "labctl/identity.env"])
def test_golden_seed_file(name):
    check_golden(f"cloud-init/{Path(name).name}", seed_files()[name])


def test_golden_diff_shown(tmp_path, monkeypatch):
    monkeypatch.delenv("LABCTL_UPDATE_GOLDEN", raising=False)
    (tmp_path / "x.txt").write_text("one\ntwo\n")
    with pytest.raises(pytest.fail.Exception) as caught:
        check_golden("x.txt", "one\nthree\n", tmp_path)
    message = str(caught.value)
    assert "-two" in message
    assert "+three" in message
    assert "LABCTL_UPDATE_GOLDEN=1" in message


# --- libvirt's RelaxNG schemas --------------------------------------------------------------


def validate(tmp_path: Path, text: str, schema: str) -> None:
    """Run virt-xml-validate; libvirt 9.0 names the schemas domain, storagevol, storagepool."""
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate is missing: install libvirt-clients (scripts/host-setup)"
    path = tmp_path / f"{schema}.xml"
    path.write_text(text)
    result = subprocess.run([tool, str(path), schema], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"{schema} schema rejects:\n{result.stderr}\n{text}"


DOMAIN_VARIANTS = {
    "linked": linked_spec,
    "full": full_spec,
    "bridge": lambda: replace(full_spec(), interfaces=(Interface("bridge", "br0",
                                                                  "52:54:00:00:00:09"),)),
    "bare": lambda: replace(full_spec(), genid="", console_log="", interfaces=(), title=""),
    "extra-args": lambda: replace(linked_spec(), user_network=None,
                                  extra_qemu_args=("-smbios", "type=1,serial=x")),
    "user-no-forward": lambda: replace(linked_spec(),
                                       user_network=UserNetwork("52:54:00:00:00:0a", 0)),
}


@pytest.mark.parametrize("variant", sorted(DOMAIN_VARIANTS))
def test_domain_schema_valid(tmp_path, variant):
    validate(tmp_path, render_domain(DOMAIN_VARIANTS[variant]()), "domain")


@pytest.mark.parametrize("backing", [True, False])
def test_volume_schema_valid(tmp_path, backing):
    layer = DiskLayer("/srv/base.qcow2", "qcow2") if backing else None
    validate(tmp_path, volume_xml("v.qcow2", 1 << 30, "qcow2", backing=layer), "storagevol")


def test_volume_raw_schema_valid(tmp_path):
    validate(tmp_path, volume_xml("seed.iso", 374784, "raw", mode="0600", allocation=374784),
             "storagevol")


def test_pool_schema_valid(tmp_path):
    validate(tmp_path, pool_xml(), "storagepool")


def test_schema_rejects_broken(tmp_path):
    broken = render_domain(linked_spec()).replace("<name>lab-l1</name>", "")
    with pytest.raises(AssertionError):
        validate(tmp_path, broken, "domain")


# --- domain XML: values are escaped, never interpreted --------------------------------------


def hostile_spec(value: str) -> DomainSpec:
    """Return a spec that carries ``value`` in every free-text field of the domain."""
    return DomainSpec(
        name=value,
        uuid="5d6f0a52-8c1e-4b7a-9f3d-2e4c6b8a1f07",
        genid="b3e1c2d4-7a6f-4e5d-8c9b-0a1f2e3d4c5b",
        title=value or "untitled",
        domain_type="qemu",
        memory_kib=131072,
        vcpus=1,
        disks=(
            Disk(f"/pool/{value}.qcow2", "qcow2", "vda",
                 backing=(DiskLayer(f"/pool/{value}-1", "qcow2"),
                          DiskLayer(f"../{value}-2", "raw"))),
            Disk(f"/pool/{value}.iso", "raw", "vdb", readonly=True, serial=value),
        ),
        metadata_xml=metadata.to_xml(fixed_record(hostname=value, fqdn=value,
                                                  extra={value: value})),
        boot=DirectBoot(f"/k/{value}", f"/i/{value}", value),
        interfaces=(Interface("network", value, value),),
        user_network=UserNetwork(value, 22001),
        console_log=f"/log/{value}",
        emulator=f"/bin/{value}",
        extra_qemu_args=(value, f"-x={value}"),
    )


def assert_domain_matches(xml: str, spec: DomainSpec) -> None:
    """Parse ``xml`` and check that every value of ``spec`` comes back exactly."""
    root = ET.fromstring(xml)
    assert root.tag == "domain"
    assert root.get("type") == spec.domain_type
    assert root.findtext("name") == spec.name
    assert root.findtext("uuid") == spec.uuid
    assert root.findtext("title") == (spec.title or spec.name)
    assert len(root.findall("name")) == 1
    assert root.findtext("devices/emulator") == spec.emulator

    if spec.boot:
        assert root.findtext("os/kernel") == spec.boot.kernel
        assert root.findtext("os/initrd") == spec.boot.initrd
        assert root.findtext("os/cmdline") == spec.boot.cmdline

    disks = root.findall("devices/disk")
    assert len(disks) == len(spec.disks)
    for element, disk in zip(disks, spec.disks):
        assert element.find("source").get("file") == disk.path
        assert element.find("target").get("dev") == disk.target
        assert element.findtext("serial") == (disk.serial or None)
        assert backing_chain(element) == list(disk.backing)

    nics = root.findall("devices/interface")
    assert [(n.get("type"), n.find("mac").get("address")) for n in nics] == [
        (nic.type, nic.mac) for nic in spec.interfaces]
    for element, nic in zip(nics, spec.interfaces):
        assert element.find("source").get(nic.type) == nic.source

    log = root.find("devices/serial/log")
    assert (log.get("file") if log is not None else "") == spec.console_log
    args = [arg.get("value") for arg in root.iterfind(f"{QEMU_NS}commandline/{QEMU_NS}arg")]
    assert args == spec.qemu_args()

    stored = root.find(f"metadata/{LABCTL_NS}desktop")
    assert element_values(stored) == element_values(ET.fromstring(spec.metadata_xml))


def backing_chain(disk: ET.Element) -> list[DiskLayer]:
    layers = []
    store = disk.find("backingStore")
    while store is not None and store.find("source") is not None:
        layers.append(DiskLayer(store.find("source").get("file"),
                                store.find("format").get("type")))
        store = store.find("backingStore")
    return layers


def element_values(element: ET.Element | None) -> list[tuple[str, dict, str]]:
    assert element is not None
    return [(child.tag, dict(child.attrib), child.text or "") for child in element]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_domain_hostile_values(value):
    spec = hostile_spec(value)
    assert_domain_matches(render_domain(spec), spec)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_domain_hostile_structure(value):
    root = ET.fromstring(render_domain(hostile_spec(value)))
    assert [child.tag for child in root] == [
        "name", "uuid", "genid", "title", "metadata", "memory", "currentMemory", "vcpu", "os",
        "features", "clock", "on_poweroff", "on_reboot", "on_crash", "devices",
        f"{QEMU_NS}commandline",
    ]
    assert [child.tag for child in root.find("devices")] == [
        "emulator", "disk", "disk", "controller", "interface", "serial", "console", "channel",
        "rng", "memballoon",
    ]


@st.composite
def domain_specs(draw) -> DomainSpec:
    text = XML_TEXT
    layers = draw(st.lists(st.builds(DiskLayer, text, text), max_size=3))
    user_network = draw(st.none() | st.builds(UserNetwork, text, st.integers(0, 65535)))
    return DomainSpec(
        name=draw(text),
        uuid=str(draw(st.uuids())),
        genid=draw(st.just("") | st.uuids().map(str)),
        title=draw(text),
        domain_type=draw(st.sampled_from(["qemu", "kvm"])),
        memory_kib=draw(st.integers(1, 1 << 40)),
        vcpus=draw(st.integers(1, 4096)),
        disks=(Disk(draw(text), "qcow2", "vda", backing=tuple(layers)),
               Disk(draw(text), "raw", "vdb", readonly=True, serial=draw(text))),
        metadata_xml=metadata.to_xml(fixed_record(hostname=draw(text),
                                                  extra={draw(text): draw(text)})),
        boot=draw(st.none() | st.builds(DirectBoot, text, text, text)),
        interfaces=tuple(draw(st.lists(st.builds(Interface, st.sampled_from(["network",
                                                                             "bridge"]),
                                                 text, text), max_size=2))),
        user_network=user_network,
        console_log=draw(text),
        agent=draw(st.booleans()),
        emulator=draw(text),
        extra_qemu_args=tuple(draw(st.lists(text, max_size=3))),
    )


@FUZZ
@given(domain_specs())
def test_domain_fuzz_roundtrip(spec):
    assert_domain_matches(render_domain(spec), spec)


# --- volume and pool XML --------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_volume_hostile_values(value):
    root = ET.fromstring(volume_xml(value, 1024, value, mode=value,
                                    backing=DiskLayer(value, value)))
    assert root.findtext("name") == value
    assert root.find("target/format").get("type") == value
    assert root.findtext("target/permissions/mode") == value
    assert root.findtext("backingStore/path") == value
    assert root.find("backingStore/format").get("type") == value
    assert [child.tag for child in root] == ["name", "capacity", "target", "backingStore"]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_pool_hostile_values(value):
    root = ET.fromstring(pool_xml(value, value))
    assert root.findtext("name") == value
    assert root.findtext("target/path") == value
    assert [child.tag for child in root] == ["name", "target"]


@FUZZ
@given(XML_TEXT, XML_TEXT, XML_TEXT, st.integers(0, 1 << 62))
def test_volume_fuzz_roundtrip(name, path, fmt, capacity):
    root = ET.fromstring(volume_xml(name, capacity, "qcow2", backing=DiskLayer(path, fmt)))
    assert root.findtext("name") == name
    assert root.findtext("capacity") == str(capacity)
    assert root.findtext("backingStore/path") == path
    assert root.find("backingStore/format").get("type") == fmt


@FUZZ
@given(XML_TEXT, XML_TEXT)
def test_pool_fuzz_roundtrip(name, path):
    root = ET.fromstring(pool_xml(name, path))
    assert root.findtext("name") == name
    assert root.findtext("target/path") == path


# --- cloud-init: values cannot add keys, lines or list items --------------------------------


def load_user_data(context: dict[str, object]) -> dict[str, object]:
    text = render.render("cloud-init/user-data.j2", **context)
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


def test_user_data_fixed_keys():
    context = user_data_context()
    assert load_user_data(context) == expected_user_data(context)


def test_user_data_optional_keys():
    context = user_data_context(timezone="", run_once=[])
    document = load_user_data(context)
    assert "timezone" not in document
    assert "runcmd" not in document
    assert document == expected_user_data(context)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_user_data_hostile_values(value):
    users = [
        {"name": value, "shell": value, "password_hash": value, "sudo": False,
         "ssh_authorized_keys": [value, f"ssh-ed25519 AAAA {value}"]},
        {"name": f"{value}2", "shell": "/bin/sh", "password_hash": "", "sudo": True,
         "ssh_authorized_keys": []},
    ]
    context = user_data_context(
        hostname=value, fqdn=value, machine_id=value, timezone=value or "x",
        ssh_host_key=KeyPair(private=value, public=value), users=users,
        password_login=True, run_once=[value, value, "- injected"],
    )
    assert load_user_data(context) == expected_user_data(context)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_meta_data_hostile_values(value):
    text = render.render("cloud-init/meta-data.j2", instance_id=value, hostname=value)
    assert yaml.safe_load(text) == {"instance-id": value, "local-hostname": value}


USERS = st.lists(
    st.fixed_dictionaries({
        "name": YAML_TEXT, "shell": YAML_TEXT, "password_hash": YAML_TEXT,
        "sudo": st.booleans(), "ssh_authorized_keys": st.lists(YAML_TEXT, max_size=3),
    }),
    max_size=3,
)


@FUZZ
@given(YAML_TEXT, YAML_TEXT, YAML_TEXT, YAML_TEXT, YAML_TEXT, YAML_TEXT, USERS,
       st.lists(YAML_TEXT, max_size=4), st.booleans())
def test_user_data_fuzz(hostname, fqdn, machine_id, timezone, private, public, users,
                        run_once, password_login):
    context = user_data_context(
        hostname=hostname, fqdn=fqdn, machine_id=machine_id, timezone=timezone,
        ssh_host_key=KeyPair(private=private, public=public), users=users,
        password_login=password_login, run_once=run_once,
    )
    assert load_user_data(context) == expected_user_data(context)


@FUZZ
@given(YAML_TEXT, YAML_TEXT)
def test_meta_data_fuzz(instance_id, hostname):
    text = render.render("cloud-init/meta-data.j2", instance_id=instance_id, hostname=hostname)
    assert yaml.safe_load(text) == {"instance-id": instance_id, "local-hostname": hostname}


@pytest.mark.parametrize("field", ["hostname", "fqdn", "name"])
@pytest.mark.parametrize("value", ["a b", "x\ny", "$(reboot)", "../etc", "a:b", "x" * 254])
def test_seed_rejects_unsafe(field, value):
    with pytest.raises(ValueError):
        build_seed(fixed_identity(**{field: value}))


def test_seed_hostile_users():
    value = "a: b\n- x\n!!python/object $(reboot) ]]> {{ x }}"
    identity = fixed_identity(
        users=(UserAccount(value, (value,), password_hash=value, shell=value),),
        timezone=value, run_once=(value, "; rm -rf /"),
    )
    document = yaml.safe_load(seed_files_of(identity)["user-data"])
    assert document["users"] == [{"name": value, "shell": value, "lock_passwd": False,
                                  "passwd": value, "ssh_authorized_keys": [value]}]
    assert document["timezone"] == value
    assert document["runcmd"] == [value, "; rm -rf /"]
    assert document["ssh_pwauth"] is True


def seed_files_of(identity: DesktopIdentity) -> dict[str, str]:
    return {item.path: item.data.decode() for item in build_seed(identity).files}


def test_identity_env_lines():
    lines = seed_files()["labctl/identity.env"].splitlines()
    assert lines == [
        "LABCTL_HOSTNAME=lab-l1",
        "LABCTL_FQDN=lab-l1.lab.test",
        "LABCTL_MACHINE_ID=5d6f0a528c1e4b7a9f3d2e4c6b8a1f07",
        "LABCTL_INSTANCE_ID=lab-l1-5d6f0a52-g1",
    ]


# --- desktop metadata (no libvirt) ----------------------------------------------------------


def test_metadata_roundtrip():
    record = fixed_record()
    assert metadata.from_xml(metadata.to_xml(record)) == record


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_metadata_hostile_roundtrip(value):
    record = fixed_record(inventory=value, hostname=value, disk=value, user=value,
                          extra={value: value, "k": value})
    assert metadata.from_xml(metadata.to_xml(record)) == record


def test_metadata_ignores_unknown():
    text = metadata.to_xml(fixed_record()).replace("</desktop>", "<future>1</future></desktop>")
    assert metadata.from_xml(text) == fixed_record()


RECORDS = st.builds(
    DesktopRecord,
    inventory=XML_TEXT, pool=XML_TEXT, index=st.integers(0, 1 << 31), clone=XML_TEXT,
    image=XML_TEXT, host=XML_TEXT, hostname=XML_TEXT, fqdn=XML_TEXT, machine_id=XML_TEXT,
    mac=XML_TEXT, disk=XML_TEXT, seed=XML_TEXT, network=XML_TEXT,
    ssh_port=st.integers(0, 65535), generation=st.integers(0, 1 << 31), state=XML_TEXT,
    created=XML_TEXT, ready_seconds=st.floats(allow_nan=False, allow_infinity=False),
    config_hash=XML_TEXT, user=XML_TEXT,
    extra=st.dictionaries(XML_TEXT, XML_TEXT, max_size=3),
)


@FUZZ
@given(RECORDS)
def test_metadata_fuzz_roundtrip(record):
    assert metadata.from_xml(metadata.to_xml(record)) == record


def test_nosharepages_only_when_memory_is_not_shared(tmp_path):
    shared = ET.fromstring(render_domain(linked_spec()))
    assert shared.find("memoryBacking") is None, "memory sharing is the default"
    xml = render_domain(replace(linked_spec(), share_pages=False))
    assert ET.fromstring(xml).find("memoryBacking/nosharepages") is not None, xml
    validate(tmp_path, xml, "domain")


def test_hot_plugged_interface_alone_matches_domain_nic():
    nic = Interface("network", "lab<&>", "52:54:00:00:00:07")
    alone = ET.fromstring(render.render("interface.xml.j2", nic=nic))
    assert alone.get("type") == "network"
    assert alone.find("source").get("network") == "lab<&>", "source not escaped back"
    assert alone.find("mac").get("address") == nic.mac
