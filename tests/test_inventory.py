"""Tests of the inventory loader: shape, strict validation with FILE:LINE, schema, fuzzing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import InventoryError
from orchestrator.images.catalog import ImageVersion
from orchestrator.inventory import expand_names, inventory_json_schema, load_inventory
from orchestrator.inventory.fields import MIB, parse_size
from orchestrator.plan import check_refresh_over

REPO = Path(__file__).resolve().parent.parent
INVENTORIES = REPO / "inventories"
FIXTURES = Path(__file__).resolve().parent / "inventories"

HEAD = """\
images:
  img: {build: tiny}
networks:
  lab: {mode: user}
pools:
  lab:
"""
# Lines of the pool body: image 7, clone 8, size 9, naming 10, extra lines from 11 on.
POOL_FIELDS = {"image": "img", "clone": "linked", "size": "2", "naming": '"lab-{n}"'}
KEY_ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAsXFunclld4td10BFg26PQy/4QNsn69so7DdOIVZAE a@b"


def pool_yaml(*extra: str, **fields: str | None) -> str:
    """Return HEAD plus one pool ``lab``; ``fields`` replace or (None) drop its keys."""
    body = dict(POOL_FIELDS)
    body.update(fields)
    lines = [f"    {key}: {value}" for key, value in body.items() if value is not None]
    lines += [f"    {line}" for line in extra]
    return HEAD + "\n".join(lines) + "\n"


def write(directory: Path, text: str, name: str = "inv.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_text(directory: Path, text: str):
    return load_inventory(write(directory, text))


def load_error(directory: Path, text: str, name: str = "inv.yaml") -> InventoryError:
    path = write(directory, text, name)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    return caught.value


def at(directory: Path, line: int, name: str = "inv.yaml") -> str:
    return f"{directory / name}:{line}"


# --- shipped inventories -------------------------------------------------------------------


def test_demo_loads():
    inventory = load_inventory(INVENTORIES / "demo.yaml")
    assert inventory.name == "demo"
    assert inventory.hosts["local"].accelerator == "auto"
    assert inventory.images["debian12"].build == "debian12"
    assert inventory.networks["lab"].mode == "user"
    assert inventory.networks["lab"].ssh_forward is True
    assert expand_names(inventory.pools["linked"]) == ["demo-l1", "demo-l2", "demo-l3"]
    assert expand_names(inventory.pools["full"]) == ["demo-f1"]


def test_demo_pool_settings():
    inventory = load_inventory(INVENTORIES / "demo.yaml")
    for pool in inventory.pools.values():
        assert pool.hardware.vcpus == 1
        assert pool.hardware.memory == 512 * MIB
        assert pool.hardware.disk == 4096 * MIB
        assert pool.identity.hostname == "{name}"
        assert pool.identity.domain == "lab.test"
        assert pool.identity.timezone == "Etc/UTC"
        (user,) = pool.identity.users
        assert user.name == "student"
        assert user.sudo is True
        assert user.password_hash is None
    assert inventory.pools["linked"].clone == "linked"
    assert inventory.pools["full"].clone == "full"


def test_tiny_loads():
    inventory = load_inventory(INVENTORIES / "tiny.yaml")
    assert inventory.images["tiny"].build == "tiny"
    assert [pool.clone for pool in inventory.pools.values()] == ["linked", "full"]
    assert inventory.pools["linked"].size == 2
    assert inventory.pools["full"].size == 1
    assert all(pool.hardware.memory == 128 * MIB for pool in inventory.pools.values())
    assert all(pool.network == "lab" for pool in inventory.pools.values())


def test_classroom_example_loads():
    inventory = load_inventory(INVENTORIES / "examples" / "classroom.yaml")
    assert inventory.name == "classroom-r101"
    assert inventory.networks["campus"].mode == "bridge"
    students = inventory.pools["students"]
    assert students.size == 12
    assert expand_names(students)[0] == "r101-s01"
    assert students.identity.domain == "r101.classroom.example"
    assert students.identity.timezone == "Europe/Berlin"
    assert students.hardware.memory == 2048 * MIB
    assert inventory.pools["exam"].instant is not None
    assert inventory.pools["exam"].hardware.disk is None
    assert inventory.images["course"].path.endswith("examples/images/course-2024.qcow2")


def test_where_points_at_key(tmp_path):
    inventory = load_text(tmp_path, pool_yaml())
    assert inventory.where(("pools", "lab", "size")) == at(tmp_path, 9)
    assert inventory.where(("pools", "lab", "naming")) == at(tmp_path, 10)
    # A key that only a model default fills reports the pool's line.
    assert inventory.where(("pools", "lab", "hardware", "memory")) == at(tmp_path, 6)


def test_where_relative_path(monkeypatch):
    monkeypatch.chdir(REPO)
    inventory = load_inventory("inventories/demo.yaml")
    assert inventory.where(("pools", "linked", "size")) == "inventories/demo.yaml:37"
    assert inventory.where(("pools", "linked", "hardware", "memory")) == "inventories/demo.yaml:8"


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MIB),
        ("4GiB", 4 << 30),
        ("1G", 1 << 30),
        ("512M", 512 * MIB),
        ("2TiB", 2 << 40),
        ("500MB", 500 * 10**6),
        ("1GB", 10**9),
        ("1.5GiB", 3 << 29),
        ("64k", 64 * 1024),
        ("1024", 1024),
        ("2048B", 2048),
        (4096, 4096),
    ],
)
def test_size_units(text, expected):
    assert parse_size(text) == expected


def test_size_stored_as_bytes(tmp_path):
    inventory = load_text(tmp_path, pool_yaml("hardware: {memory: 1G, disk: 10GiB}"))
    assert inventory.pools["lab"].hardware.memory == 1 << 30
    assert inventory.pools["lab"].hardware.disk == 10 << 30


@pytest.mark.parametrize(
    ("hardware", "message"),
    [
        ("{memory: 32MiB}", "below the minimum of 64MiB"),
        ("{disk: 1MiB}", "below the minimum of 64MiB"),
        ("{memory: lots}", "invalid size 'lots'"),
        ("{memory: true}", "expected a size, got boolean"),
        ("{memory: 1.5}", "expected a size, got number"),
        ("{memory: 1.0000001K}", "not a whole number of bytes"),
    ],
)
def test_size_invalid(tmp_path, hardware, message):
    error = load_error(tmp_path, pool_yaml(f"hardware: {hardware}"))
    assert error.where == at(tmp_path, 11)
    assert "pools.lab.hardware." in error.message
    assert message in error.message


@pytest.mark.parametrize(("vcpus", "message"), [(0, "at least 1"), (256, "at most 255")])
def test_vcpus_range(tmp_path, vcpus, message):
    error = load_error(tmp_path, pool_yaml(f"hardware: {{vcpus: {vcpus}}}"))
    assert error.where == at(tmp_path, 11)
    assert "pools.lab.hardware.vcpus" in error.message
    assert message in error.message


# --- naming --------------------------------------------------------------------------------


def test_naming_fixed_width(tmp_path):
    inventory = load_text(tmp_path, pool_yaml(size="3", naming='"pc{n:fixed=3}"'))
    assert expand_names(inventory.pools["lab"]) == ["pc001", "pc002", "pc003"]


@pytest.mark.parametrize(
    ("naming", "message"),
    [
        ('"lab"', "must contain {n} exactly once, found 0"),
        ('"{n}-{n}"', "must contain {n} exactly once, found 2"),
        ('"lab_{n}"', "characters not allowed"),
        ('"-lab{n}"', "start or end with a dash"),
        ('"lab-{x}"', "unknown placeholder {x}"),
        ('"lab-{n"', "unmatched brace"),
        ('"<lab>{n}"', "characters not allowed"),
        ('"lab;{n}"', "characters not allowed"),
    ],
)
def test_naming_invalid(tmp_path, naming, message):
    error = load_error(tmp_path, pool_yaml(naming=naming))
    assert error.where == at(tmp_path, 10)
    assert "pools.lab.naming" in error.message
    assert message in error.message


def test_naming_too_long(tmp_path):
    error = load_error(tmp_path, pool_yaml(size="20", naming='"verylongprefix-{n}"'))
    assert error.where == at(tmp_path, 10)
    assert error.message == (
        "pools.lab.naming: pattern 'verylongprefix-{n}' makes 17-character names for 20 "
        "desktops; names are limited to 15 characters (NetBIOS), so with 2-digit numbers the "
        "prefix and suffix around {n} may be at most 13 characters"
    )
    assert error.fix == "shorten the prefix and suffix to 13 characters in all"


def test_naming_fixed_too_narrow(tmp_path):
    error = load_error(tmp_path, pool_yaml(size="120", naming='"pc{n:fixed=2}"'))
    assert error.where == at(tmp_path, 10)
    assert "at most 99 desktops" in error.message
    assert "fixed=3" in error.fix


def test_names_default_size(tmp_path):
    text = pool_yaml(size=None, naming=None) + "    names: [alpha, beta, gamma]\n"
    inventory = load_text(tmp_path, text)
    assert inventory.pools["lab"].size == 3
    assert expand_names(inventory.pools["lab"]) == ["alpha", "beta", "gamma"]


def test_names_and_naming(tmp_path):
    error = load_error(tmp_path, pool_yaml("names: [a, b]"))
    assert error.where == at(tmp_path, 10)
    assert "exactly one of naming: (a pattern) or names: (a list)" in error.message


def test_names_nor_naming(tmp_path):
    error = load_error(tmp_path, pool_yaml(naming=None))
    assert error.where == at(tmp_path, 6)
    assert "pools.lab:" in error.message
    assert "exactly one of naming" in error.message


def test_names_count_mismatch(tmp_path):
    error = load_error(tmp_path, pool_yaml("names: [a, b, c]", naming=None))
    assert error.where == at(tmp_path, 9)
    assert "pools.lab.size" in error.message
    assert "lists 3 desktops but size is 2" in error.message


def test_names_duplicate(tmp_path):
    error = load_error(tmp_path, pool_yaml("names: [pc1, PC1]", naming=None))
    assert error.where == at(tmp_path, 10)
    assert "listed twice" in error.message


@pytest.mark.parametrize(
    "name",
    ["bad name", "toolongdesktopname", "-lead", "trail-", "a'b", "x\ny", "a;b", "<x/>"],
)
def test_names_invalid_entry(tmp_path, name):
    error = load_error(tmp_path, pool_yaml(f"names: [{json.dumps(name)}]", size="1", naming=None))
    assert error.where == at(tmp_path, 10)
    assert "pools.lab.names[0]" in error.message


def test_pools_overlap(tmp_path):
    # lab-{n:fixed=1} is another pattern than lab-{n}, yet both make lab-1 and lab-2.
    text = (
        pool_yaml()
        + '  other:\n    image: img\n    clone: full\n    size: 3\n'
        + '    naming: "lab-{n:fixed=1}"\n'
    )
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 15)
    assert f"pools 'lab' ({at(tmp_path, 10)}) and 'other' ({at(tmp_path, 15)})" in error.message
    assert "'lab-1'" in error.message


def test_pools_share_pattern(tmp_path):
    text = (
        pool_yaml()
        + '  other:\n    image: img\n    clone: full\n    size: 3\n    naming: "lab-{n}"\n'
    )
    inventory = load_text(tmp_path, text)
    assert set(inventory.pools) == {"lab", "other"}


def test_shared_pattern_too_long(tmp_path):
    # Alone, each pool's names fit (lab-prefixxxx-1 to lab-prefixxxx-9, 15 characters); together
    # the 18 desktops need two digits, and the pattern then leaves 13 characters of text.
    text = (
        pool_yaml(size="9", naming='"lab-prefixxxx-{n}"')
        + '  other:\n    image: img\n    clone: full\n    size: 9\n'
        + '    naming: "lab-prefixxxx-{n}"\n'
    )
    error = load_error(tmp_path, text)
    assert "pools lab, other share the pattern 'lab-prefixxxx-{n}'" in error.message, error
    assert "numbers go up to 18" in error.message, error
    assert "may be at most 13 characters" in error.message, error


def test_pools_same_names_lists(tmp_path):
    text = (
        pool_yaml(size=None, naming=None, names="[a1, b1]")
        + "  other:\n    image: img\n    clone: full\n    names: [c1, B1]\n"
    )
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 13), error
    assert "both make the desktop 'B1'" in error.message, error


def test_pools_overlap_names_list(tmp_path):
    text = pool_yaml() + "  other:\n    image: img\n    clone: full\n    names: [x, LAB-2]\n"
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 14)
    assert "'LAB-2'" in error.message


@pytest.mark.parametrize(
    ("section", "text", "line"),
    [
        ("pools", pool_yaml().replace("  lab:\n", "  Lab 1:\n"), 6),
        ("images", pool_yaml().replace("  img: {build", "  My.Img: {build"), 2),
        ("networks", pool_yaml().replace("  lab: {mode", "  lab<x>: {mode"), 4),
        ("hosts", "hosts:\n  -bad: {uri: 'qemu:///system'}\n", 2),
    ],
)
def test_key_names_invalid(tmp_path, section, text, line):
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, line)
    assert error.message.startswith(f"{section}: invalid")
    assert "lowercase letters, digits, '-' and '_'" in error.fix


# --- references and identity ---------------------------------------------------------------


def test_image_not_defined(tmp_path):
    error = load_error(tmp_path, pool_yaml(image="imgg"))
    assert error.where == at(tmp_path, 7)
    assert "pools.lab.image: image 'imgg' is not defined under images:" in error.message
    assert error.fix == "did you mean 'img'?"


def test_host_not_defined(tmp_path):
    error = load_error(tmp_path, pool_yaml("host: remote"))
    assert error.where == at(tmp_path, 11)
    assert "host 'remote' is not defined under hosts: (defined: 'local')" in error.message


def test_network_not_defined(tmp_path):
    error = load_error(tmp_path, pool_yaml("network: lan"))
    assert error.where == at(tmp_path, 11)
    assert "network 'lan' is not defined" in error.message
    assert error.fix == "did you mean 'lab'?"


def test_reference_from_defaults(tmp_path):
    error = load_error(tmp_path, "defaults:\n  network: nope\n" + pool_yaml())
    assert error.where == at(tmp_path, 2)
    assert "pools.lab.network" in error.message


def test_instant_needs_instant_clone(tmp_path):
    error = load_error(tmp_path, pool_yaml("instant: {method: fork}"))
    assert error.where == at(tmp_path, 11)
    assert "pools.lab.instant" in error.message
    assert "clone is linked" in error.message


def test_instant_default_method(tmp_path):
    inventory = load_text(tmp_path, pool_yaml(clone="instant"))
    assert inventory.pools["lab"].instant.method == "fork"


def test_instant_restore(tmp_path):
    inventory = load_text(tmp_path, pool_yaml("instant: {method: restore}", clone="instant"))
    assert inventory.pools["lab"].instant.method == "restore"


def identity_yaml(*user_lines: str, **identity: str) -> str:
    """A pool with identity keys on line 12 on and one user whose keys start at line 14."""
    lines = ["identity:"]
    lines += [f"  {key}: {value}" for key, value in identity.items()]
    if user_lines:
        lines += ["  users:", f"    - {user_lines[0]}"]
        lines += [f"      {line}" for line in user_lines[1:]]
    return pool_yaml(*lines)


def test_user_valid(tmp_path):
    text = identity_yaml(
        "name: ann", f'ssh_authorized_keys: ["{KEY_ED25519}"]', "password_hash: '$6$ab$cd'"
    )
    user = load_text(tmp_path, text).pools["lab"].identity.users[0]
    assert user.name == "ann"
    assert user.ssh_authorized_keys == [KEY_ED25519]
    assert user.shell == "/bin/bash"


@pytest.mark.parametrize("name", ["Student", "1abc", "a b", "root;x", "x" * 33])
def test_user_name_invalid(tmp_path, name):
    error = load_error(tmp_path, identity_yaml(f"name: {json.dumps(name)}"))
    assert error.where == at(tmp_path, 13)
    assert "pools.lab.identity.users[0].name" in error.message
    assert "POSIX user name" in error.fix


@pytest.mark.parametrize(
    "password_hash",
    [
        "$y$j9T$abcdefghijklmnop$wRwvHNqzMkHLG74uLLCRVTwaZ.a1aIothEUeYGf9oED",
        "$gy$j9T$abcdefghijklmnop$FsKX1p0E7/YAeYYYk8JwEoSmY2j55FT86HbjrAKDjV9",
        "$7$CU..../....abcdefgh$T0sduvKxu8wrIjSE2QDlEIQ24zoUNt7XmCAyI.79rw6",
        "$2b$05$abcdefghijklmnopqrstuuHIrMEWpUCQe2YqFR3sXwQ75u4od..9q",
        "$5$abcd$zZA/0qLgoSH67pe3824tVxM.c9kUup4SAH1VanH0FR.",
        "$6$rounds=5000$abcd$uQZaz9xQBejvX2R1u2x93SXlAvfV3SAU2qoX20YNobk9HllUTM5ihgzh9",
    ],
)
def test_password_hash_formats(tmp_path, password_hash):
    text = identity_yaml("name: ann", f"password_hash: '{password_hash}'")
    user = load_text(tmp_path, text).pools["lab"].identity.users[0]
    assert user.password_hash == password_hash


def test_password_md5_rejected(tmp_path):
    text = identity_yaml("name: ann", "password_hash: '$1$abcd$ZxZeq65rYzBW8OZXL4RQd.'")
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 14)
    assert "weak or unknown crypt(3) method" in error.message
    assert "$abcd$" not in str(error)


def test_password_empty_rejected(tmp_path):
    error = load_error(tmp_path, identity_yaml("name: ann", "password_hash: ''"))
    assert error.where == at(tmp_path, 14)
    assert "must be a crypt(3) hash" in error.message


def test_password_plain(tmp_path):
    error = load_error(tmp_path, identity_yaml("name: ann", "password_hash: hunter2secret"))
    assert error.where == at(tmp_path, 14)
    assert "pools.lab.identity.users[0].password_hash" in error.message
    assert "mkpasswd -m sha-512" in error.fix
    assert "openssl passwd -6" in error.fix
    assert "hunter2secret" not in str(error)


def test_password_wrong_type_hidden(tmp_path):
    error = load_error(tmp_path, identity_yaml("name: ann", "password_hash: 123456"))
    assert "123456" not in str(error)
    assert "expected a string" in error.message


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("ssh-ed25519 AAAA... a@b", "not valid base64"),
        ("ssh-foo AAAAC3NzaC1lZDI1NTE5 a@b", "no known key type"),
        ("AAAAC3NzaC1lZDI1NTE5", "no known key type"),
        (KEY_ED25519.replace("ssh-ed25519", "ssh-rsa"), "does not match its type"),
        (KEY_ED25519 + "\\nssh-rsa x", "single line"),
        (KEY_ED25519 + "\\0", "NUL"),
    ],
)
def test_ssh_key_invalid(tmp_path, key, message):
    text = identity_yaml("name: ann", f'ssh_authorized_keys: ["{key}"]')
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 14)
    assert "pools.lab.identity.users[0].ssh_authorized_keys[0]" in error.message
    assert message in error.message


def test_timezone_unknown(tmp_path):
    error = load_error(tmp_path, identity_yaml(timezone="Mars/Olympus_Mons"))
    assert error.where == at(tmp_path, 12)
    assert "unknown time zone 'Mars/Olympus_Mons'" in error.message


def test_domain_invalid(tmp_path):
    error = load_error(tmp_path, identity_yaml(domain='"lab..test"'))
    assert error.where == at(tmp_path, 12)
    assert "pools.lab.identity.domain" in error.message


def test_hostname_pattern_expands(tmp_path):
    text = pool_yaml("identity: {hostname: 'ws-{pool}-{n:fixed=2}', domain: lab.test}")
    inventory = load_text(tmp_path, text)
    assert inventory.pools["lab"].identity.hostname == "ws-{pool}-{n:fixed=2}"


def test_hostname_invalid_from_pool_key(tmp_path):
    text = pool_yaml("identity: {hostname: '{pool}-{n}'}").replace("  lab:\n", "  my_lab:\n")
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 11)
    assert "makes 'my_lab-1', which is not a valid hostname" in error.message


@pytest.mark.parametrize("hostname", ["'a b'", "'x\\\"y'", "'h;rm'", "'{user}'", "'<h>'"])
def test_hostname_pattern_invalid(tmp_path, hostname):
    error = load_error(tmp_path, pool_yaml(f"identity: {{hostname: {hostname}}}"))
    assert error.where == at(tmp_path, 11)
    assert "pools.lab.identity.hostname" in error.message


def test_hostname_duplicate(tmp_path):
    error = load_error(tmp_path, pool_yaml("identity: {hostname: desk}"))
    assert error.where == at(tmp_path, 11)
    assert "both get the hostname 'desk'" in error.message
    assert "{name}" in error.fix


def test_uri_without_scheme(tmp_path):
    error = load_error(tmp_path, "hosts:\n  local:\n    uri: localhost\n")
    assert error.where == at(tmp_path, 3)
    assert "hosts.local.uri: libvirt URI 'localhost' is invalid" in error.message


def test_accelerator_invalid(tmp_path):
    text = "hosts:\n  local:\n    uri: qemu:///system\n    accelerator: kvmm\n"
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 4)
    assert "expected 'auto', 'kvm' or 'tcg', got string 'kvmm'" in error.message
    assert error.fix == "did you mean 'kvm'?"


def test_run_once_free_text(tmp_path):
    command = "printf '%s\\n' \"<b>&amp;\" | tee /etc/x; echo $HOME"
    text = pool_yaml("identity:", f'  run_once: [{json.dumps(command)}, "a\\nb"]')
    inventory = load_text(tmp_path, text)
    assert inventory.pools["lab"].identity.run_once == [command, "a\nb"]


def test_run_once_nul(tmp_path):
    error = load_error(tmp_path, pool_yaml("identity:", '  run_once: ["a\\0b"]'))
    assert error.where == at(tmp_path, 12)
    assert "pools.lab.identity.run_once[0]: contains a NUL character" in error.message


def test_run_once_total_limit(tmp_path):
    chunk = "x" * 40_000
    error = load_error(tmp_path, pool_yaml("identity:", f"  run_once: [{chunk}, {chunk}]"))
    assert error.where == at(tmp_path, 12)
    assert "total 80000 characters" in error.message


def test_string_length_limit(tmp_path):
    error = load_error(tmp_path, pool_yaml(f"identity: {{domain: {'a' * 5000}}}"))
    assert error.where == at(tmp_path, 11)
    assert "more than the maximum of 4096" in error.message


# --- strictness ----------------------------------------------------------------------------


def test_unknown_key_suggestion(tmp_path):
    error = load_error(tmp_path, pool_yaml("namng: x"))
    assert error.where == at(tmp_path, 11)
    assert error.message == "pools.lab: unknown key 'namng'"
    assert error.fix == "did you mean 'naming'?"


def test_unknown_key_lists_allowed(tmp_path):
    error = load_error(tmp_path, pool_yaml("hardware: {zzz: 1}"))
    assert error.where == at(tmp_path, 11)
    assert "pools.lab.hardware: unknown key 'zzz'" in error.message
    assert error.fix == "allowed keys here: vcpus, memory, disk, share_memory"


def test_unknown_top_level_key(tmp_path):
    error = load_error(tmp_path, "pool:\n  lab: {}\n")
    assert error.where == at(tmp_path, 1)
    assert error.fix == "did you mean 'pools'?"


def test_unknown_defaults_key(tmp_path):
    error = load_error(tmp_path, "defaults:\n  hardwar: {vcpus: 2}\n" + pool_yaml())
    assert error.where == at(tmp_path, 2)
    assert error.fix == "did you mean 'hardware'?"


def test_wrong_type_string_for_int(tmp_path):
    error = load_error(tmp_path, pool_yaml(size='"three"'))
    assert error.where == at(tmp_path, 9)
    assert error.message == "pools.lab.size: expected an integer, got string 'three'"


def test_wrong_type_mapping(tmp_path):
    error = load_error(tmp_path, pool_yaml("hardware: 4"))
    assert error.where == at(tmp_path, 11)
    assert error.message == "pools.lab.hardware: expected a mapping, got integer 4"


def test_wrong_type_number_for_string(tmp_path):
    text = pool_yaml().replace("{build: tiny}", "{build: tiny, version: 12345678}")
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 2)
    assert "images.img.version: expected a string, got integer" in error.message
    assert "quote" in error.fix


def test_network_mode_unknown(tmp_path):
    error = load_error(tmp_path, pool_yaml().replace("{mode: user}", "{mode: usr}"))
    assert error.where == at(tmp_path, 4)
    assert "networks.lab.mode: unknown network mode 'usr'" in error.message
    assert error.fix == "did you mean 'user'?"


def test_network_field_missing(tmp_path):
    error = load_error(tmp_path, pool_yaml().replace("{mode: user}", "{mode: bridge}"))
    assert error.where == at(tmp_path, 4)
    assert error.message == "networks.lab.bridge: is missing"


def test_network_field_invalid(tmp_path):
    text = pool_yaml().replace("{mode: user}", "{mode: network, network: 'a b'}")
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 4)
    assert error.message.startswith("networks.lab.network: libvirt network name 'a b'")


def test_network_mode_missing(tmp_path):
    error = load_error(tmp_path, pool_yaml().replace("{mode: user}", "{bridge: br0}"))
    assert error.where == at(tmp_path, 4)
    assert error.message == "networks.lab.mode: is missing"


def test_missing_required(tmp_path):
    error = load_error(tmp_path, pool_yaml(image=None))
    assert error.where == at(tmp_path, 6)
    assert error.message == "pools.lab.image: is missing"


def test_image_needs_one_source(tmp_path):
    text = pool_yaml().replace("{build: tiny}", "{build: tiny, path: /x.qcow2}")
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 2)
    assert "exactly one of build:, path: or catalog:" in error.message


def test_image_recipe_unknown(tmp_path):
    error = load_error(tmp_path, pool_yaml().replace("{build: tiny}", "{build: tinyy}"))
    assert error.where == at(tmp_path, 2)
    assert error.fix == "did you mean 'tiny'?"


def test_error_is_one_line(tmp_path):
    error = load_error(tmp_path, pool_yaml(size='"a\\nb"'))
    assert "\n" not in str(error)


# --- vars ----------------------------------------------------------------------------------


def test_vars_render(tmp_path):
    text = "vars:\n  room: r1\n  prefix: '{{ room }}-pc'\n  seats: 3\n" + pool_yaml(
        size='"{{ seats }}"', naming='"{{ prefix }}{n}"'
    )
    pool = load_text(tmp_path, text).pools["lab"]
    assert pool.size == 3
    assert expand_names(pool) == ["r1-pc1", "r1-pc2", "r1-pc3"]


def test_vars_later_var_undefined(tmp_path):
    error = load_error(tmp_path, "vars:\n  a: '{{ b }}'\n  b: x\n" + pool_yaml())
    assert error.where == at(tmp_path, 2)
    assert error.message == "vars.a: undefined variable 'b'"
    assert "before this variable" in error.fix


def test_vars_undefined_in_value(tmp_path):
    text = "vars:\n  prefix: lab\n" + pool_yaml(naming='"{{ prefx }}-{n}"')
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 12)
    assert error.message == "pools.lab.naming: undefined variable 'prefx'"
    assert error.fix.startswith("did you mean 'prefix'?")


def test_vars_syntax_error(tmp_path):
    error = load_error(tmp_path, pool_yaml(naming='"{{ x -{n}"'))
    assert error.where == at(tmp_path, 10)
    assert "pools.lab.naming: invalid template" in error.message


def test_vars_sandboxed(tmp_path):
    text = pool_yaml(naming="\"{{ ''.__class__.__mro__[1].__subclasses__() }}\"")
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 10)
    assert "pools.lab.naming" in error.message


def test_vars_repeat_bounded(tmp_path):
    started = time.monotonic()
    error = load_error(tmp_path, pool_yaml(naming="\"{{ 'a' * 100000000 }}\""))
    assert error.where == at(tmp_path, 10)
    assert time.monotonic() - started < 2


def test_vars_undefined_attribute(tmp_path):
    error = load_error(tmp_path, "vars:\n  x: {a: 1}\n  y: '{{ x.b }}-z'\n" + pool_yaml())
    assert error.where == at(tmp_path, 3)
    assert error.message == "vars.y: 'mapping' has no attribute 'b'"


def test_vars_reuse_bounded(tmp_path):
    lines = ["vars:", "  big: [" + ", ".join(["x"] * 5000) + "]"]
    lines += [f"  copy{index}: '{{{{ big }}}}'" for index in range(100)]
    started = time.monotonic()
    error = load_error(tmp_path, "\n".join(lines) + "\n")
    assert "more than 100000 YAML values" in error.message
    assert error.where.startswith(str(tmp_path / "inv.yaml") + ":")
    assert time.monotonic() - started < 2


def test_vars_native_list(tmp_path):
    text = "vars:\n  people: [{name: ann}, {name: bob}]\n" + pool_yaml(
        "identity: {users: '{{ people }}'}"
    )
    users = load_text(tmp_path, text).pools["lab"].identity.users
    assert [user.name for user in users] == ["ann", "bob"]


def test_vars_native_error_points_at_var(tmp_path):
    text = "vars:\n  people: [{name: Ann}]\n" + pool_yaml("identity: {users: '{{ people }}'}")
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 2)
    assert "pools.lab.identity.users[0].name" in error.message


def test_vars_invalid_name(tmp_path):
    error = load_error(tmp_path, "vars:\n  my-var: 1\n" + pool_yaml())
    assert error.where == at(tmp_path, 2)
    assert "vars.my-var: invalid variable name" in error.message


def test_vars_single_brace_kept(tmp_path):
    text = "vars:\n  p: x\n" + pool_yaml(naming='"{{ p }}-{n:fixed=2}"')
    pool = load_text(tmp_path, text).pools["lab"]
    assert pool.naming == "x-{n:fixed=2}"


# --- includes ------------------------------------------------------------------------------


def test_include_nested():
    inventory = load_inventory(FIXTURES / "include-main.yaml")
    assert inventory.hosts["local"].uri == "test:///default"
    assert expand_names(inventory.pools["lab"]) == ["inc-1", "inc-2"]
    hardware = inventory.pools["lab"].hardware
    assert hardware.memory == 256 * MIB  # the including file's defaults win
    assert hardware.vcpus == 2  # merged from the included file's defaults
    assert inventory.pools["lab"].network == "lab"
    assert inventory.where(("images", "tiny")).endswith("sub/images.yaml:2")


def test_include_cycle(tmp_path):
    write(tmp_path, "include: [b.yaml]\n", "a.yaml")
    write(tmp_path, "pools: {}\ninclude:\n  - a.yaml\n", "b.yaml")
    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path / "a.yaml")
    error = caught.value
    assert error.where == at(tmp_path, 3, "b.yaml")
    chain = f"{tmp_path}/a.yaml -> {tmp_path}/b.yaml -> {tmp_path}/a.yaml"
    assert error.message == f"include cycle: {chain}"


def test_include_missing(tmp_path):
    error = load_error(tmp_path, "pools: {}\ninclude:\n  - common.yaml\n  - nope.yaml\n")
    assert error.where == at(tmp_path, 3)
    assert "common.yaml not found" in error.message


def test_include_same_pool_twice(tmp_path):
    write(tmp_path, pool_yaml(), "common.yaml")
    text = "include: [common.yaml]\npools:\n  lab: {image: img, clone: full, size: 1}\n"
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 3)
    assert error.message == (
        f"pools.lab is defined twice: at {at(tmp_path, 6, 'common.yaml')} and at {at(tmp_path, 3)}"
    )


def test_include_twice(tmp_path):
    write(tmp_path, "vars: {a: 1}\n", "common.yaml")
    write(tmp_path, "include: [common.yaml]\n", "other.yaml")
    error = load_error(tmp_path, "include:\n  - common.yaml\n  - other.yaml\n")
    assert error.where == at(tmp_path, 1, "other.yaml")
    assert "included twice" in error.message


def test_include_name_only_main(tmp_path):
    write(tmp_path, "name: other\n", "common.yaml")
    error = load_error(tmp_path, "include: [common.yaml]\n")
    assert error.where == at(tmp_path, 1, "common.yaml")
    assert "only in the main inventory file" in error.message


# --- YAML safety and hostile input ---------------------------------------------------------


def test_python_tag_not_constructed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"vars:\n  x: !!python/object/apply:os.system ['touch {marker}']\n"
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 2)
    assert "the YAML tag !!python/object/apply:os.system is not allowed" in error.message
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["!!binary aGk=", "!!set {a: null}", "!vault abc", "!!omap []"])
def test_other_tags_rejected(tmp_path, tag):
    error = load_error(tmp_path, f"pools: {{}}\nvars:\n  x: {tag}\n")
    assert error.where == at(tmp_path, 3)
    assert "is not allowed" in error.message


def test_duplicate_key(tmp_path):
    error = load_error(tmp_path, pool_yaml("size: 3"))
    assert error.where == at(tmp_path, 11)
    assert "duplicate key pools.lab.size: defined at line 9 and again at line 11" in (error.message)


def test_file_too_large(tmp_path):
    error = load_error(tmp_path, "# padding\n" * 120_000)
    assert error.where == str(tmp_path / "inv.yaml")
    assert "larger than 1024 KiB" in error.message


def test_billion_laughs(tmp_path):
    lines = ["vars:", "  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        aliases = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"  a{level}: &a{level} [{aliases}]")
    started = time.monotonic()
    error = load_error(tmp_path, "\n".join(lines) + "\n")
    assert "more than 100000 YAML values" in error.message
    assert time.monotonic() - started < 2


def test_recursive_alias(tmp_path):
    error = load_error(tmp_path, "vars:\n  a: &a [1, *a]\n")
    assert error.where == at(tmp_path, 2)
    assert "inside its own anchor" in error.message


def test_deep_nesting(tmp_path):
    error = load_error(tmp_path, "vars:\n  a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert error.where.startswith(at(tmp_path, 2))
    assert "nest" in error.message


def test_malformed_yaml(tmp_path):
    error = load_error(tmp_path, "pools:\n  lab: [a, b\n  other: x\n")
    assert error.where == at(tmp_path, 3)
    assert error.message.startswith("invalid YAML:")
    assert "(line 3, column" in error.message
    assert "\n" not in str(error)


def test_merge_key_supported(tmp_path):
    text = "defaults: &d\n  network: lab\n" + pool_yaml("<<: *d")
    pool = load_text(tmp_path, text).pools["lab"]
    assert pool.network == "lab"


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    error = load_error(tmp_path, text)
    assert error.where == str(tmp_path / "inv.yaml")
    assert "empty" in error.message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "string")])
def test_top_level_not_mapping(tmp_path, text, kind):
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 1)
    assert f"must be a mapping of keys such as pools:, got a {kind}" in error.message


def test_two_documents(tmp_path):
    error = load_error(tmp_path, "pools: {}\n---\npools: {}\n")
    assert error.where == at(tmp_path, 2)
    assert "more than one YAML document" in error.message


def test_not_utf8(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_bytes(b"pools: {}\nvars:\n  a: \xff\xfe\n")
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert caught.value.where == at(tmp_path, 3)
    assert "not valid UTF-8" in caught.value.message


def test_control_character(tmp_path):
    error = load_error(tmp_path, "pools: {}\nvars:\n  a: b\x07\n")
    assert error.where == at(tmp_path, 3)
    assert "control character U+0007" in error.message


def test_file_not_found(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path / "missing.yaml")
    assert "not found" in caught.value.message


def test_directory_rejected(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path / "dir.yaml")
    assert "directory" in caught.value.message


def test_name_from_file_stem(tmp_path):
    assert load_inventory(write(tmp_path, "pools: {}\n", "lab-2.yaml")).name == "lab-2"


def test_name_from_bad_stem(tmp_path):
    error = load_error(tmp_path, "pools: {}\n", "my lab.yaml")
    assert "add name:" in error.fix


def test_name_invalid(tmp_path):
    error = load_error(tmp_path, "name: 'a b'\n")
    assert error.where == at(tmp_path, 1)
    assert "name: inventory name 'a b' is invalid" in error.message


# --- hosts, images, networks defaults ------------------------------------------------------


def test_default_host(tmp_path):
    host = load_text(tmp_path, pool_yaml()).hosts["local"]
    assert host.uri == "qemu:///system"
    assert host.accelerator == "auto"
    assert host.storage.pool == "labctl"
    assert host.storage.path == "/var/lib/labctl/pool"
    assert (host.limits.provisioning, host.limits.power, host.limits.maintenance) == (2, 4, 1)


def test_empty_hosts_no_default(tmp_path):
    error = load_error(tmp_path, "hosts: {}\n" + pool_yaml())
    assert error.where == at(tmp_path, 7)
    assert "host 'local' is not defined" in error.message
    assert "remove the empty hosts:" in error.fix


def test_empty_sections_without_pools(tmp_path):
    inventory = load_text(tmp_path, "hosts: {}\nimages: {}\nnetworks:\npools:\n")
    assert inventory.hosts == {}
    assert inventory.pools == {}


def test_image_relative_path(tmp_path):
    text = pool_yaml().replace("{build: tiny}", "{path: golden/a.qcow2, version: 3f9c1a2b}")
    image = load_text(tmp_path, text).images["img"]
    assert image.path == str(tmp_path / "golden" / "a.qcow2")
    assert image.version == "3f9c1a2b"


# --- JSON Schema ---------------------------------------------------------------------------


def test_schema_is_valid():
    schema = inventory_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_top_level_keys():
    properties = inventory_json_schema()["properties"]
    for key in ("name", "vars", "include", "defaults", "hosts", "images", "networks", "pools"):
        assert key in properties


def test_schema_accepts_shipped():
    validator = jsonschema.Draft202012Validator(inventory_json_schema())
    for path in (INVENTORIES / "demo.yaml", INVENTORIES / "tiny.yaml"):
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert errors == [], path


def test_schema_size_string_or_int():
    memory = inventory_json_schema()["$defs"]["Hardware"]["properties"]["memory"]
    kinds = {option["type"] for option in memory["anyOf"]}
    assert kinds == {"integer", "string"}


def test_schema_rejects_bad():
    validator = jsonschema.Draft202012Validator(inventory_json_schema())
    document = {"pools": {"lab": {"image": "x", "clone": "linkd", "size": 1, "namng": "a"}}}
    assert list(validator.iter_errors(document))
    assert list(validator.iter_errors({"pools": {"Bad Key": {}}}))


# --- fuzzing -------------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("LABCTL_FUZZ_EXAMPLES", "300")),
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
YAMLISH = st.text(
    alphabet=st.sampled_from(list("abn{}[]:-,&*!|>'\"#%@` \n\t\\0123456789$<.=?~")), max_size=300
)


def _load_quietly(path: Path) -> None:
    try:
        load_inventory(path)
    except InventoryError as error:
        assert error.message
        assert "\n" not in str(error)


@FUZZ_SETTINGS
@given(text=YAMLISH | st.text(max_size=300))
def test_fuzz_random_text(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, errors="surrogatepass")
    _load_quietly(path)


DEMO_TEXT = (INVENTORIES / "demo.yaml").read_text()


@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(DEMO_TEXT)),
            st.integers(min_value=0, max_value=20),
            st.text(alphabet=st.sampled_from(list("{}[]:-,&*!|'\"# \n\tnx0129$<>%")), max_size=8),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_demo_mutations(tmp_path, edits):
    text = DEMO_TEXT
    for start, length, replacement in edits:
        text = text[:start] + replacement + text[start + length :]
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    _load_quietly(path)


VOCABULARY = sorted(
    {
        *("name", "vars", "include", "defaults", "hosts", "images", "networks", "pools"),
        *("local", "lab", "img", "uri", "accelerator", "storage", "pool", "path"),
        *("limits", "provisioning", "power", "build", "version", "mode", "ssh_forward", "network", "bridge"),
        *("image", "clone", "size", "naming", "names", "host", "hardware", "vcpus"),
        *("memory", "disk", "instant", "method", "identity", "hostname", "domain"),
        *("timezone", "users", "ssh_authorized_keys", "password_hash", "sudo", "shell"),
        *("run_once", "user", "linked", "full", "tiny", "debian12", "fork", "<<"),
    }
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.sampled_from(VOCABULARY)
    | st.sampled_from(["lab-{n}", "{{ x }}", "{{ 1 }}", "512MiB", "qemu:///system", "{n:fixed=2}"])
    | st.text(max_size=20)
)
DOCUMENTS = st.dictionaries(
    st.sampled_from(VOCABULARY),
    st.recursive(
        SCALARS,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(VOCABULARY) | st.text(max_size=8), children, max_size=5
            )
        ),
        max_leaves=30,
    ),
    max_size=6,
)


@FUZZ_SETTINGS
@given(document=DOCUMENTS)
def test_fuzz_structured(tmp_path, document):
    path = tmp_path / "structured.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _load_quietly(path)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


DEMO_DATA = yaml.safe_load(DEMO_TEXT)
DEMO_PATHS = [path for path in _paths(DEMO_DATA) if path]


@FUZZ_SETTINGS
@given(
    replacements=st.lists(
        st.tuples(st.sampled_from(DEMO_PATHS), st.recursive(SCALARS, st.lists, max_leaves=4)),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_demo_values(tmp_path, replacements):
    document = json.loads(json.dumps(DEMO_DATA))
    for path, value in replacements:
        _replace(document, path, value)
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _load_quietly(path)


def _replace(document, path, value) -> None:
    """Set the value at ``path`` unless an earlier replacement removed that path."""
    target = document
    try:
        for part in path[:-1]:
            target = target[part]
        if isinstance(target, (dict, list)):
            target[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


def test_fork_refuses_unshared_memory(tmp_path):
    """fork shares pages by design, so share_memory: false must be refused, not ignored."""
    path = tmp_path / "inv.yaml"
    path.write_text(
        "name: fork\n"
        "images: {tiny: {build: tiny}}\n"
        "pools:\n"
        "  kids:\n"
        "    image: tiny\n"
        "    clone: instant\n"
        "    instant: {method: fork}\n"
        "    size: 2\n"
        "    naming: kid{n}\n"
        "    hardware: {share_memory: false}\n"
    )
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert "share_memory: false" in caught.value.message, caught.value.message
    assert "method: restore" in (caught.value.fix or ""), caught.value.fix


@pytest.mark.parametrize(("host", "pool", "line", "message"), [
    ("{uri: 'qemu+ssh://nobody@127.0.0.1/system'}",
     "{image: tiny, clone: instant, size: 1, naming: 'r{n}', host: far}", 6,
     "instant clones need the libvirt host to be this machine"),
    ("{uri: 'qemu+ssh://nobody@127.0.0.1/system', ksm: true}",
     "{image: tiny, clone: linked, size: 1, naming: 'r{n}', host: far}", 3,
     "ksm: applies only to the local host"),
])
def test_local_only_rejected_before_connecting(tmp_path, monkeypatch, host, pool, line, message):
    """Rejected from the inventory alone: no connection to the remote URI is opened."""
    from orchestrator import plan

    path = tmp_path / "remote.yaml"
    path.write_text(f"name: remote\nhosts:\n  far: {host}\nimages: {{tiny: {{build: tiny}}}}\n"
                    f"pools:\n  kids: {pool}\n")

    def no_connection(*_args, **_kwargs):
        raise AssertionError("make_plan connected to the remote host")

    monkeypatch.setattr(plan, "open_inventory_host", no_connection)
    with pytest.raises(InventoryError) as caught:
        plan.make_plan(load_inventory(path))
    assert message in caught.value.message, caught.value.message
    assert caught.value.where == f"{path}:{line}"


# --- pool policies ---------------------------------------------------------------------------


def test_policy_defaults(tmp_path):
    pool = load_text(tmp_path, pool_yaml()).pools["lab"]
    assert pool.provisioning.mode == "up-front"
    assert (pool.provisioning.min_desktops, pool.provisioning.spare_desktops) == (0, 1)
    assert pool.provisioning.enabled and pool.provisioning.stop_on_error
    assert (pool.assignment.type, pool.assignment.automatic) == ("floating", True)
    assert (pool.logoff, pool.refresh_over, pool.power_policy) == ("keep", None, "always-on")
    assert (pool.recompose.strategy, pool.recompose.grace) == ("wait-for-logoff", 300)
    assert pool.storage == []


def test_up_front_accepts_zero_min(tmp_path):
    """min: 0 and spare: 0 change nothing in an up-front pool, e.g. to override defaults:."""
    pool = load_text(tmp_path, pool_yaml("provisioning: {mode: up-front, min: 0, spare: 0}"))
    provisioning = pool.pools["lab"].provisioning
    assert provisioning.mode == "up-front"
    assert provisioning.min_desktops == 0


def test_policies_parse(tmp_path):
    pool = load_text(tmp_path, pool_yaml(
        "provisioning: {mode: on-demand, min: 1, spare: 2, stop_on_error: false}",
        "assignment: {type: dedicated, automatic: false}",
        "logoff: refresh",
        "refresh_over: 2GiB",
        "power: suspend",
        "recompose: {strategy: force, grace: 5m, min_ready: 1}",
        size="4",
    )).pools["lab"]
    assert (pool.provisioning.min_desktops, pool.provisioning.spare_desktops) == (1, 2)
    assert pool.refresh_over == 2048 * MIB
    assert pool.recompose.grace == 300
    assert pool.recompose.strategy == "force"
    assert pool.power_policy == "suspend"


@pytest.mark.parametrize(
    ("line", "message", "fix"),
    [
        ("provisioning: {mode: on-demand, min: 3}",
         "provisioning.min is 3, more than the pool's size of 2", "lower min: to at most 2"),
        ("provisioning: {mode: on-demand, spare: 5}",
         "provisioning.spare is 5, more than the pool's size of 2", "lower spare: to at most 2"),
        ("provisioning: {spare: 1}", "spare applies only to mode: on-demand",
         "set mode: on-demand"),
        ("recompose: {min_ready: 3}", "recompose.min_ready is 3", "at most 1"),
        ("recompose: {min_ready: 2}", "could never take a desktop down", "at most 1"),
        ("recompose: {grace: 5 minutes}", "invalid duration '5 minutes'", "5m"),
        ("recompose: {grace: 5m}", "recompose.grace: grace applies only to strategy: force",
         "set strategy: force"),
        ("refresh_over: 1KiB", "below the minimum of 1MiB", ""),
        ("power: hibernate", "power", "always-on"),
    ],
)
def test_policy_errors(tmp_path, line, message, fix):
    error = load_error(tmp_path, pool_yaml(line))
    assert error.where == at(tmp_path, 11), error
    assert message in error.message, error
    assert fix in (error.fix or "") or fix in error.message, error


def tiny_version(virtual_size: int) -> ImageVersion:
    return ImageVersion(name="tiny", version="0123abcd", sha256="", disk="/nonexistent",
                        format="qcow2", virtual_size=virtual_size, actual_size=0, boot=None)


@pytest.mark.parametrize("hardware", ["", "hardware: {disk: 2GiB}"])
def test_refresh_over_above_disk(tmp_path, hardware):
    """refresh_over above the disk size could never fire: plan rejects it at its line."""
    lines = ["refresh_over: 3GiB"] + ([hardware] if hardware else [])
    inventory = load_inventory(write(tmp_path, pool_yaml(*lines)))
    with pytest.raises(InventoryError) as caught:
        check_refresh_over(inventory, {"img": tiny_version(1 << 30)})
    error = caught.value
    assert error.where == at(tmp_path, 11), error
    disk = 2048 if hardware else 1024
    assert error.message == (
        f"pools.lab.refresh_over: 3072 MiB is more than the desktops' disk of {disk} MiB "
        "(image tiny@0123abcd), so the overlay never grows past it and no desktop is ever "
        "refreshed"), error
    assert error.fix == f"use a refresh_over below {disk}MiB, or a larger hardware.disk"
    check_refresh_over(inventory, {"img": tiny_version(4 << 30)})  # a larger image: fine
    check_refresh_over(inventory, {"img": None})  # not built yet: checked later


def test_dedicated_pool_cannot_delete_on_logoff(tmp_path):
    error = load_error(tmp_path, pool_yaml("assignment: {type: dedicated}", "logoff: delete"))
    assert error.where == at(tmp_path, 12), error
    assert "dedicated desktop away from its user" in error.message
    assert "logoff: refresh or keep" in error.fix


def test_instant_pool_has_no_power_policy(tmp_path):
    error = load_error(tmp_path, pool_yaml("power: power-off", clone="instant"))
    assert error.where == at(tmp_path, 11), error
    assert "does not apply to instant clones" in error.message


def test_full_pool_has_no_overlay_threshold(tmp_path):
    error = load_error(tmp_path, pool_yaml("refresh_over: 1GiB", clone="full"))
    assert "a full clone has none" in error.message
    assert error.where == at(tmp_path, 11)


def test_storage_must_be_a_pool_of_the_host(tmp_path):
    text = (
        "hosts:\n  local:\n    uri: qemu:///system\n"
        "    storage_pools: [{pool: fast, path: /srv/fast}]\n"
        + pool_yaml("storage: [labctl, fats]")
    )
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 15), error
    assert "'fats' is not a storage pool of host 'local'" in error.message
    assert "fast" in error.fix
    pool = load_text(tmp_path, text.replace("fats", "fast")).pools["lab"]
    assert pool.storage == ["labctl", "fast"]


def test_host_limits(tmp_path):
    text = "hosts:\n  local:\n    uri: qemu:///system\n    limits: {power: 0}\n" + pool_yaml()
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 4), error


def test_host_ready_timeout_duration(tmp_path):
    text = "hosts:\n  local:\n    uri: qemu:///system\n    ready_timeout: 20m\n" + pool_yaml()
    assert load_text(tmp_path, text).hosts["local"].ready_timeout == 1200


@pytest.mark.parametrize("value", ["0", "2d"])
def test_host_ready_timeout_range(tmp_path, value):
    text = f"hosts:\n  local:\n    uri: qemu:///system\n    ready_timeout: {value}\n" + pool_yaml()
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 4), error
    assert "is outside 1 to 86400 s" in error.message, error.message


def test_host_tcg_cache_bound(tmp_path):
    text = "hosts:\n  local:\n    uri: qemu:///system\n    tcg_cache: 1PiB\n" + pool_yaml()
    error = load_error(tmp_path, text)
    assert error.where == at(tmp_path, 4), error
    assert "above the maximum of 2GiB" in error.message, error.message
