"""Tests of the NoCloud seed ISO: read back with pycdlib, names, content, modes, secrets."""

from __future__ import annotations

import io
import stat

import pycdlib
import pytest

from orchestrator.identity.desktop import DesktopIdentity, UserAccount, build_seed
from orchestrator.identity.keys import KeyPair, generate_ed25519
from orchestrator.storage.seed import Seed

ACCESS_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFIXEDTESTACCESSKEYseed000000000000000 labctl-t"
PRIVATE = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "VEVTVC1PTkxZLU5PVC1BLVJFQUwtS0VZLXNlZWQ=\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFIXEDTESTHOSTKEYseed0000000000000000000 root@s1"

# Rock Ridge path -> whether the file is private (mode 0400; the others are 0444).
EXPECTED_FILES = {
    "/meta-data": False,
    "/user-data": True,
    "/labctl/identity.env": False,
    "/labctl/ssh_host_ed25519_key": True,
    "/labctl/ssh_host_ed25519_key.pub": False,
    "/labctl/authorized_keys": False,
}


def identity() -> DesktopIdentity:
    return DesktopIdentity(
        name="seed-s1", hostname="seed-s1", fqdn="seed-s1.lab.test",
        uuid="7c9e6679-7425-40de-944b-e07fc1f90ae7",
        genid="16fd2706-8baf-433b-82eb-8c7fada847da", mac="52:54:00:10:20:30",
        generation=2, ssh_host_key=KeyPair(private=PRIVATE, public=PUBLIC),
        users=(UserAccount("student", (ACCESS_KEY,), sudo=True),),
        root_authorized_keys=(ACCESS_KEY, "ssh-ed25519 AAAAC3Nza second@key"),
    )


@pytest.fixture(scope="module")
def iso():
    """The seed of ``identity()`` as an ISO image opened with pycdlib."""
    reader = pycdlib.PyCdlib()
    reader.open_fp(io.BytesIO(build_seed(identity()).to_iso()))
    yield reader
    reader.close()


def read_rr(reader: pycdlib.PyCdlib, path: str) -> bytes:
    out = io.BytesIO()
    reader.get_file_from_iso_fp(out, rr_path=path)
    return out.getvalue()


def read_joliet(reader: pycdlib.PyCdlib, path: str) -> bytes:
    out = io.BytesIO()
    reader.get_file_from_iso_fp(out, joliet_path=path)
    return out.getvalue()


def rr_files(reader: pycdlib.PyCdlib) -> set[str]:
    found = set()
    for root, _dirs, files in reader.walk(rr_path="/"):
        found.update(f"{root.rstrip('/')}/{name}" for name in files)
    return found


def test_seed_volume_id(iso):
    assert iso.pvd.volume_identifier.decode().rstrip() == "CIDATA"


def test_seed_has_extensions(iso):
    assert iso.has_rock_ridge()
    assert iso.has_joliet()


def test_seed_file_names(iso):
    assert rr_files(iso) == set(EXPECTED_FILES)


def test_seed_file_content(iso):
    expected = {f"/{item.path}": item.data for item in build_seed(identity()).files}
    for path in EXPECTED_FILES:
        assert read_rr(iso, path) == expected[path], path


def test_seed_joliet_content(iso):
    for path in EXPECTED_FILES:
        assert read_joliet(iso, path) == read_rr(iso, path), path


def test_seed_key_files(iso):
    assert read_rr(iso, "/labctl/ssh_host_ed25519_key") == PRIVATE.encode()
    assert read_rr(iso, "/labctl/ssh_host_ed25519_key.pub") == (PUBLIC + "\n").encode()
    assert read_rr(iso, "/labctl/authorized_keys") == (
        f"{ACCESS_KEY}\nssh-ed25519 AAAAC3Nza second@key\n").encode()


def test_seed_identity_env(iso):
    assert read_rr(iso, "/labctl/identity.env").decode().splitlines() == [
        "LABCTL_HOSTNAME=seed-s1",
        "LABCTL_FQDN=seed-s1.lab.test",
        "LABCTL_MACHINE_ID=7c9e6679742540de944be07fc1f90ae7",
        "LABCTL_INSTANCE_ID=seed-s1-7c9e6679-g2",
    ]


def test_seed_meta_data(iso):
    assert read_rr(iso, "/meta-data") == (
        b'instance-id: "seed-s1-7c9e6679-g2"\nlocal-hostname: "seed-s1"\n')


@pytest.mark.parametrize("path", sorted(EXPECTED_FILES))
def test_seed_file_mode(iso, path):
    mode = iso.get_record(rr_path=path).rock_ridge.get_file_mode()
    assert stat.S_ISREG(mode)
    assert stat.S_IMODE(mode) == (0o400 if EXPECTED_FILES[path] else 0o444)


def test_seed_marks_secrets():
    seed = build_seed(identity())
    assert seed.holds_secrets
    assert {item.path for item in seed.files if item.private} == {
        "user-data", "labctl/ssh_host_ed25519_key"}


def test_seed_without_secrets():
    seed = Seed()
    seed.add("meta-data", "instance-id: x\n")
    assert not seed.holds_secrets


def test_seed_nested_dirs():
    seed = Seed()
    seed.add("a/b/c.txt", b"deep")
    seed.add("a/top.txt", "top")
    reader = pycdlib.PyCdlib()
    reader.open_fp(io.BytesIO(seed.to_iso()))
    try:
        assert rr_files(reader) == {"/a/b/c.txt", "/a/top.txt"}
        assert read_rr(reader, "/a/b/c.txt") == b"deep"
    finally:
        reader.close()


def test_keypair_repr_redacted():
    pair = KeyPair(private=PRIVATE, public=PUBLIC)
    assert PRIVATE not in repr(pair)
    assert "VEVTVC1PTkxZ" not in repr(pair)
    assert PUBLIC in repr(pair)


def test_identity_repr_redacted():
    text = repr(identity())
    assert "VEVTVC1PTkxZ" not in text
    assert "PRIVATE KEY" not in text
    assert "seed-s1" in text
    assert "VEVTVC1PTkxZ" not in str(identity())


def test_generated_key_redacted():
    pair = generate_ed25519("root@x")
    body = pair.private.splitlines()[1]
    assert pair.private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert body not in repr(pair)
    assert pair.public.startswith("ssh-ed25519 ")
    assert pair.public.endswith(" root@x")
