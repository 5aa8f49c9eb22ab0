"""Property-based fuzzing of the inventory loader and of the renderers it feeds.

The loader may only raise LabctlError subclasses, whatever bytes it reads. A hostile
value placed at any string field of a valid inventory is either rejected with a one-line
InventoryError at a FILE:LINE, or accepted unchanged. An accepted value must come back
unchanged from the cloud-init seed (yaml.safe_load) and from the domain, volume and
storage pool XML (xml.etree) that provisioning renders from it (tests/roundtrip.py).
LABCTL_FUZZ_EXAMPLES sets the number of examples per test (default 150).
"""

from __future__ import annotations

import copy
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator import render
from orchestrator.domain import Interface
from orchestrator.errors import InventoryError, LabctlError
from orchestrator.inventory import load_inventory
from roundtrip import check_inventory_renders

FUZZ = settings(
    max_examples=int(os.environ.get("LABCTL_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAsXFunclld4td10BFg26PQy/4QNsn69so7DdOIVZAE"
# Pieces that break naive XML, YAML, shell or path handling, and odd Unicode.
PIECES = [
    "<", ">", "&", "]]>", "<![CDATA[", "&amp;", "&#0;", '"', "'", "\n", "\r", "\r\n", "\t",
    "$(reboot)", "`id`", ";", "|", "&&", "../", "/", "..", ".", "~", "\x00", "\x07", "\x1b[2J",
    "\x7f", "\x85", "\u2028", "\ufeff", "\u202e", "\U0001f600", "- ", ": ", " #",
    "!!python/name:os.system", "*a", "&a", "{n}", "{name}", "{pool}", "%s", "%", "\\", "null",
    "yes", " ", "-", "_", "a", "Z", "0",
]
HOSTILE = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=10).map("".join)
# Jinja markers are rendered, not kept: see test_fuzz_jinja_values for those.
PLAIN_HOSTILE = HOSTILE.filter(lambda text: "{{" not in text and "{%" not in text)

BASE = {
    "name": "hzfuzz",
    "vars": {"v": "x"},
    "hosts": {"local": {"uri": "qemu:///system",
                        "storage": {"pool": "hzfuzz", "path": "/var/lib/hzfuzz"}}},
    "images": {"img": {"build": "tiny"}},
    "networks": {"lab": {"mode": "network", "network": "default"}},
    "pools": {"lab": {
        "image": "img", "clone": "linked", "size": 1, "naming": "hzf-{n}", "network": "lab",
        "identity": {
            "hostname": "{name}", "domain": "lab.test", "timezone": "Etc/UTC",
            "users": [{"name": "student", "shell": "/bin/bash", "password_hash": "$6$s$h",
                       "ssh_authorized_keys": [f"{KEY} student"]}],
            "run_once": ["echo ready"],
        },
    }},
}
IDENTITY = ("pools", "lab", "identity")
USER = (*IDENTITY, "users", 0)
# Each field: its key path, the prefix that keeps the value plausible (so that some
# examples pass validation and reach the renderers), and where the model keeps it.
FIELDS = {
    "name": (("name",), "", lambda inv: inv.name),
    "uri": (("hosts", "local", "uri"), "qemu:///", lambda inv: inv.hosts["local"].uri),
    "storage_pool": (("hosts", "local", "storage", "pool"), "",
                     lambda inv: inv.hosts["local"].storage.pool),
    "storage_path": (("hosts", "local", "storage", "path"), "/var/",
                     lambda inv: inv.hosts["local"].storage.path),
    "image_catalog": (("images", "img", "build"), "", lambda inv: inv.images["img"].build),
    "network": (("networks", "lab", "network"), "", lambda inv: inv.networks["lab"].network),
    "naming": (("pools", "lab", "naming"), "{n}", lambda inv: inv.pools["lab"].naming),
    "hostname": ((*IDENTITY, "hostname"), "{n}", lambda inv: inv.pools["lab"].identity.hostname),
    "domain": ((*IDENTITY, "domain"), "", lambda inv: inv.pools["lab"].identity.domain),
    "timezone": ((*IDENTITY, "timezone"), "", lambda inv: inv.pools["lab"].identity.timezone),
    "user": ((*USER, "name"), "", lambda inv: inv.pools["lab"].identity.users[0].name),
    "shell": ((*USER, "shell"), "/", lambda inv: inv.pools["lab"].identity.users[0].shell),
    "password_hash": ((*USER, "password_hash"), "$6$",
                      lambda inv: inv.pools["lab"].identity.users[0].password_hash),
    "ssh_key": ((*USER, "ssh_authorized_keys", 0), f"{KEY} ",
                lambda inv: inv.pools["lab"].identity.users[0].ssh_authorized_keys[0]),
    "run_once": ((*IDENTITY, "run_once", 0), "", lambda inv: inv.pools["lab"].identity.run_once[0]),
    "vars": (("vars", "v"), "", lambda inv: None),
}


def write_document(directory: Path, document: dict) -> Path:
    path = directory / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=False, sort_keys=False))
    return path


def load_or_error(path: Path):
    """Load ``path``; return the inventory, or None after checking the error's form."""
    try:
        return load_inventory(path)
    except InventoryError as error:
        assert error.message, "an error without a message"
        assert "\n" not in str(error), repr(str(error))
        assert "\r" not in str(error), repr(str(error))
        assert re.fullmatch(rf"{re.escape(str(path))}:\d+", error.where or ""), error.where
        return None


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_loader_bytes(tmp_path, data):
    """Arbitrary bytes: the loader raises a LabctlError or returns, nothing else."""
    path = tmp_path / "bytes.yaml"
    path.write_bytes(data)
    try:
        load_inventory(path)
    except LabctlError as error:
        assert "\n" not in str(error), repr(str(error))


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`?,\n\t $<.\\0")),
                    max_size=300) | HOSTILE)
def test_fuzz_loader_text(tmp_path, text):
    """Arbitrary YAML-like text: only LabctlError subclasses come out."""
    path = tmp_path / "text.yaml"
    path.write_text(text, errors="surrogatepass")
    try:
        load_inventory(path)
    except LabctlError as error:
        assert "\n" not in str(error), repr(str(error))


@FUZZ
@given(field=st.sampled_from(sorted(FIELDS)), value=PLAIN_HOSTILE)
def test_fuzz_field_rejected_or_round_trips(tmp_path, field, value):
    """A hostile value at any string field is rejected at its line, or kept and rendered
    back unchanged into the seed and the XML."""
    key_path, prefix, stored = FIELDS[field]
    value = prefix + value
    document = copy.deepcopy(BASE)
    target = document
    for part in key_path[:-1]:
        target = target[part]
    target[key_path[-1]] = value
    inventory = load_or_error(write_document(tmp_path, document))
    event(f"{field}: {'accepted' if inventory else 'rejected'}")
    if inventory is None:
        return
    if field != "vars":
        assert stored(inventory) == value
    check_inventory_renders(inventory)


@FUZZ
@given(pool=PLAIN_HOSTILE, image=PLAIN_HOSTILE, network=PLAIN_HOSTILE)
def test_fuzz_section_keys(tmp_path, pool, image, network):
    """Hostile keys under pools:, images: and networks: are rejected or work as references."""
    document = copy.deepcopy(BASE)
    document["pools"] = {pool: {**BASE["pools"]["lab"], "image": image, "network": network}}
    document["images"] = {image: BASE["images"]["img"]}
    document["networks"] = {network: BASE["networks"]["lab"]}
    inventory = load_or_error(write_document(tmp_path, document))
    event("accepted" if inventory else "rejected")
    if inventory is not None:
        assert list(inventory.pools) == [pool]
        check_inventory_renders(inventory)


JINJA_TOKENS = [
    "{{", "}}", "{%", "%}", " for x in ", " endfor ", " if ", " endif ", " set ", "range(",
    ")", "(", "v", "x", "'a'", "'<&>'", "1", "99999", "70000", "**", "*", "%", "~", "|",
    "join", "replace", "center", "list", "sort", "length", "upper", "format", "zfill",
    "__class__", ".", ",", "[", "]", " ", "raw", "endraw", "macro", "include", "'/etc/passwd'",
]


@FUZZ
@given(template=st.lists(st.sampled_from(JINJA_TOKENS), min_size=1, max_size=16).map("".join))
def test_fuzz_jinja_values(tmp_path, template):
    """Random Jinja in a run_once command: rejected, or rendered into a value that
    round-trips like any other."""
    document = copy.deepcopy(BASE)
    document["pools"]["lab"]["identity"]["run_once"] = [template]
    inventory = load_or_error(write_document(tmp_path, document))
    event("accepted" if inventory else "rejected")
    if inventory is not None:
        check_inventory_renders(inventory)


@FUZZ
@given(kind=st.sampled_from(["network", "bridge"]), source=HOSTILE, mac=HOSTILE)
def test_fuzz_interface_xml(kind, source, mac):
    """The hot-plugged NIC alone: source and MAC come back at their attributes."""
    xml_chars = "".join(ch for ch in source + mac if _xml_char(ch))
    source, mac = xml_chars[: len(xml_chars) // 2], xml_chars[len(xml_chars) // 2 :]
    element = ET.fromstring(render.render("interface.xml.j2", nic=Interface(kind, source, mac)))
    assert element.get("type") == kind
    assert element.find("mac").get("address") == mac
    assert element.find("source").attrib == {kind: source}
    assert [child.tag for child in element] == ["mac", "source", "model"]


def _xml_char(char: str) -> bool:
    """True for characters XML 1.0 can carry at all (libvirt rejects the others)."""
    code = ord(char)
    return code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or (
        code >= 0x10000
    )
