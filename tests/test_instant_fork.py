"""Instant clones by fork: a parent saved with x-ignore-shared, children that continue from it.

The libvirt tests boot one tiny parent per module (direct kernel boot, 128 MiB, TCG,
no seed and no NIC), save its device state and destroy it. Every child maps the
parent's RAM file copy-on-write and gets its own overlay on the parent's overlay. The
tiny image without a seed writes a random machine-id at boot, so a child that reports
the parent's machine-id and boot id continued from the parent's memory, and did not
boot. The fixture removes every domain, volume, RAM file and state file it made.

Run with ``-s`` to see the timings and memory figures each test prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest
from conftest import TEST_POOL, TEST_POOL_PATH

from orchestrator.domain import DirectBoot, Disk, DiskLayer, DomainSpec, render_domain
from orchestrator.guest import agent
from orchestrator.instant import fork
from orchestrator.storage import pool as volumes
from orchestrator.storage import replica

MEMORY = 128 << 20
# Seconds for the parent's first boot under TCG, with other tests' guests running.
BOOT_TIMEOUT = 180
# Seconds for one save or load of the device state, and for a child's agent.
STATE_TIMEOUT = 60
CHILD_AGENT_TIMEOUT = 30


@dataclass
class Parent:
    """A saved parent: what children need, and what the parent reported before the save."""

    prefix: str
    pool: libvirt.virStoragePool
    boot: DirectBoot
    disk: DiskLayer
    chain: tuple[DiskLayer, ...]
    disk_bytes: int
    ram_file: str
    state_path: str
    state_bytes: int
    machine_id: str
    boot_id: str
    ram_sha256: str
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)


def domain_xml(name: str, boot: DirectBoot, disk: Disk, args: list[str]) -> str:
    """Return the XML of a NIC-less tiny domain. Parent and children differ only in ``args``."""
    spec = DomainSpec(
        name=name, uuid=str(uuid.uuid4()), domain_type="qemu", memory_kib=MEMORY // 1024,
        vcpus=1, disks=(disk,), metadata_xml="", boot=boot, extra_qemu_args=tuple(args),
    )
    return render_domain(spec)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qemu_memory_kib(name: str) -> dict[str, int]:
    """Return the Pss lines (KiB) of smaps_rollup of the domain's QEMU process."""
    pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup
              if line.startswith("Pss")}
    assert "Pss" in fields, f"no Pss line in /proc/{pid}/smaps_rollup of {name}"
    return fields


def describe_memory(fields: dict[str, int]) -> str:
    return (f"PSS {fields['Pss'] >> 10} MiB (anonymous {fields.get('Pss_Anon', 0) >> 10} MiB, "
            f"RAM file {fields.get('Pss_Shmem', 0) >> 10} MiB)")


def guest_text(domain: libvirt.virDomain, path: str) -> str:
    return agent.check_output(domain, ["cat", path]).strip()


def active_names(conn: libvirt.virConnect) -> set[str]:
    active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    return {domain.name() for domain in active}


def clean_up(conn: libvirt.virConnect, pool: libvirt.virStoragePool, prefix: str,
             files: list[str]) -> None:
    """Destroy the domains and delete the volumes named ``prefix*``, then remove ``files``."""
    for domain in conn.listAllDomains(0):
        if domain.name().startswith(prefix):
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                domain.undefine()
    volumes.refresh(pool)
    names = [volume.name() for volume in pool.listAllVolumes(0)
             if volume.name().startswith(prefix)]
    # Overlays of the parent's overlay first, then the parent's overlay.
    for name in sorted(names, key=lambda name: name.endswith("-parent.qcow2")):
        volumes.delete(pool, name)
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    replica.remove_unused(pool)


@pytest.fixture(scope="module")
def parent(conn, tiny_image, tmp_path_factory) -> Iterator[Parent]:
    """Boot the tiny parent once, save its device state and destroy it. Remove it all after."""
    prefix = f"labctl-t-fork-{secrets.token_hex(3)}-"
    pool = volumes.ensure_pool(conn, TEST_POOL, TEST_POOL_PATH)
    ram_file = fork.ram_path(prefix.rstrip("-"))
    state_path = str(tmp_path_factory.mktemp("fork") / "parent.state")
    try:
        yield _saved_parent(conn, pool, tiny_image, prefix, ram_file, state_path)
    finally:
        clean_up(conn, pool, prefix, [ram_file, state_path, state_path + ".partial"])


def _saved_parent(conn, pool, image, prefix: str, ram_file: str, state_path: str) -> Parent:
    with replica.replica_lock(pool, image.version):
        base = replica.ensure_replica(pool, image)
        overlay = volumes.create_overlay(pool, f"{prefix}parent.qcow2", base.disk,
                                         image.virtual_size)
    boot = DirectBoot(base.kernel, base.initrd, image.boot.cmdline)
    disk = Disk(overlay.path(), "qcow2", "vda", backing=(base.disk,))
    fork.prepare_ram_dir()
    fork.create_ram_file(ram_file)
    domain = conn.createXML(
        domain_xml(f"{prefix}parent", boot, disk, fork.parent_args(ram_file, MEMORY)), 0)
    agent.wait_for_agent(domain, timeout=BOOT_TIMEOUT)
    machine_id = guest_text(domain, "/etc/machine-id")
    boot_id = guest_text(domain, "/proc/sys/kernel/random/boot_id")
    parent_memory = qemu_memory_kib(domain.name())
    domain.suspend()
    started = time.monotonic()
    state_bytes = fork.save_device_state(domain, state_path, timeout=STATE_TIMEOUT)
    save_seconds = time.monotonic() - started
    domain.destroy()
    return Parent(
        prefix=prefix, pool=pool, boot=boot, disk=DiskLayer(overlay.path(), "qcow2"),
        chain=(DiskLayer(overlay.path(), "qcow2"), base.disk),
        disk_bytes=image.virtual_size, ram_file=ram_file,
        state_path=state_path, state_bytes=state_bytes, machine_id=machine_id,
        boot_id=boot_id, ram_sha256=sha256_file(ram_file), timings={"save": save_seconds},
        memory=parent_memory,
    )


def start_child(conn, parent: Parent, suffix: str) -> tuple[libvirt.virDomain, float]:
    """Start a paused child on its own overlay. Return it and the seconds the start took."""
    name = f"{parent.prefix}{suffix}"
    overlay = volumes.create_overlay(parent.pool, f"{name}.qcow2", parent.disk,
                                     parent.disk_bytes)
    disk = Disk(overlay.path(), "qcow2", "vda", backing=parent.chain)
    xml = domain_xml(name, parent.boot, disk, fork.child_args(parent.ram_file, MEMORY))
    started = time.monotonic()
    domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    return domain, time.monotonic() - started


def test_ram_path_rejects_bad_keys():
    assert fork.ram_path("p-0a1b") == f"{fork.RAM_DIR}/p-0a1b.ram"
    for key in ("", "A", "../x", "a/b", "a.b", "a b"):
        with pytest.raises(fork.ForkError, match="invalid parent key"):
            fork.ram_path(key)


def test_parent_args_share_the_ram_file():
    args = fork.parent_args("/dev/shm/labctl/p,1.ram", MEMORY)
    assert args[0] == "-object"
    assert '"mem-path":"/dev/shm/labctl/p,1.ram"' in args[1], "the path must stay intact"
    assert '"share":true' in args[1]
    assert f'"size":{MEMORY}' in args[1]
    assert args[2:] == ["-machine", f"memory-backend={fork.MEMORY_BACKEND_ID}"]
    assert "-incoming" not in args


def test_child_args_map_private(tmp_path):
    ram_file = tmp_path / "p.ram"
    ram_file.write_bytes(b"")
    os.truncate(ram_file, MEMORY)
    args = fork.child_args(str(ram_file), MEMORY)
    assert '"share":false' in args[1], "a shared child would write into the parent's file"
    assert args[-2:] == ["-incoming", "defer"]


def test_child_args_check_ram_file(tmp_path):
    with pytest.raises(fork.ForkError, match="does not exist"):
        fork.child_args(str(tmp_path / "missing.ram"), MEMORY)
    ram_file = tmp_path / "small.ram"
    ram_file.write_bytes(b"\0" * 4096)
    with pytest.raises(fork.ForkError, match="4096 bytes"):
        fork.child_args(str(ram_file), MEMORY)


def test_memory_args_reject_bad_sizes():
    for size in (0, -MEMORY, MEMORY + 4096):
        with pytest.raises(fork.ForkError, match="invalid memory size"):
            fork.parent_args("/dev/shm/labctl/p.ram", size)
    with pytest.raises(fork.ForkError, match="not absolute"):
        fork.parent_args("p.ram", MEMORY)


def test_qemu_user_from_conf(tmp_path):
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "nobody"\nuser = "+0"   # root\ngroup = "+0"\n')
    assert fork.qemu_user(str(conf)) == (0, 0)
    conf.write_text('user = "no-such-user-labctl"\n')
    with pytest.raises(fork.ForkError, match="does not exist"):
        fork.qemu_user(str(conf))


def test_qemu_user_default(tmp_path):
    uid, _gid = fork.qemu_user(str(tmp_path / "absent.conf"))
    try:
        expected = pwd.getpwnam("libvirt-qemu").pw_uid
    except KeyError:
        pytest.skip("no libvirt-qemu user on this host")
    assert uid == expected


def test_unavailable_reason_other_driver():
    conn = libvirt.open("test:///default")
    try:
        reason = fork.unavailable_reason(conn)
    finally:
        conn.close()
    assert reason is not None and "not a QEMU connection" in reason


@pytest.mark.libvirt
def test_unavailable_reason_local_system(conn):
    assert fork.unavailable_reason(conn) is None


@pytest.mark.libvirt
def test_prepare_ram_dir_owner_and_mode():
    fork.prepare_ram_dir()
    fork.prepare_ram_dir()  # a second call must succeed and change nothing
    info = os.lstat(fork.RAM_DIR)
    uid, gid = fork.qemu_user()
    assert (info.st_uid, info.st_gid) == (uid, gid)
    assert info.st_mode & 0o777 == 0o700, f"mode {oct(info.st_mode)}"


@pytest.mark.libvirt
def test_ram_file_private_to_qemu(parent):
    """QEMU filled the RAM file labctl created and kept its owner and mode."""
    info = os.lstat(parent.ram_file)
    assert (info.st_uid, info.st_gid) == fork.qemu_user()
    assert info.st_mode & 0o777 == 0o600, f"mode {oct(info.st_mode)}"
    assert info.st_size == MEMORY, f"QEMU did not size the file: {info.st_size} bytes"


@pytest.mark.libvirt
def test_children_continue_from_parent(conn, parent):
    children = {}
    for suffix in ("child1", "child2"):
        domain, start_seconds = start_child(conn, parent, suffix)
        started = time.monotonic()
        fork.load_device_state(domain, parent.state_path, timeout=STATE_TIMEOUT)
        load_seconds = time.monotonic() - started
        domain.resume()
        children[suffix] = domain
        print(f"fork {suffix}: start paused {start_seconds:.2f} s, "
              f"load_device_state {load_seconds:.3f} s")

    for suffix, domain in children.items():
        agent.wait_for_agent(domain, timeout=CHILD_AGENT_TIMEOUT)
        assert guest_text(domain, "/etc/machine-id") == parent.machine_id, (
            f"{suffix} has another machine-id, so it booted instead of continuing")
        assert guest_text(domain, "/proc/sys/kernel/random/boot_id") == parent.boot_id
        # 16 MiB written into the guest's tmpfs make the child dirty its memory.
        agent.check_output(domain, ["dd", "if=/dev/urandom", "of=/tmp/fill", "bs=1M",
                                    "count=16"])
    assert {domain.name() for domain in children.values()} <= active_names(conn)

    ram_stat = os.stat(parent.ram_file)
    print(f"fork parent: save_device_state {parent.timings['save']:.3f} s, state file "
          f"{parent.state_bytes} bytes, RAM file {ram_stat.st_size >> 20} MiB "
          f"({ram_stat.st_blocks * 512 >> 20} MiB in use on tmpfs), QEMU before the save: "
          f"{describe_memory(parent.memory)}")
    for suffix, domain in children.items():
        print(f"fork {suffix}: QEMU {describe_memory(qemu_memory_kib(domain.name()))}")
    assert parent.state_bytes < MEMORY // 16, "the state file should hold no guest RAM"
    assert sha256_file(parent.ram_file) == parent.ram_sha256, (
        "a child wrote into the parent's RAM file instead of its private copy")


@pytest.mark.libvirt
def test_save_rejects_running_domain(conn, parent, tmp_path):
    domain, _seconds = start_child(conn, parent, "running")
    fork.load_device_state(domain, parent.state_path, timeout=STATE_TIMEOUT)
    domain.resume()
    state_path = tmp_path / "running.state"
    with pytest.raises(fork.ForkError, match="not paused but running") as error:
        fork.save_device_state(domain, str(state_path), timeout=STATE_TIMEOUT)
    assert error.value.where == domain.name()
    domain.suspend()
    with pytest.raises(fork.ForkError, match="share=False, expected True"):
        fork.save_device_state(domain, str(state_path), timeout=STATE_TIMEOUT)
    assert list(tmp_path.iterdir()) == [], "a failed save left a file behind"


def _truncated(parent: Parent, path: Path) -> None:
    data = Path(parent.state_path).read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.libvirt
@pytest.mark.parametrize(("case", "expected"), [
    ("missing", "cannot open it: No such file"),
    ("fifo", "not a regular file"),
    ("not-a-stream", "not a QEMU migration stream"),
    ("truncated", "QEMU: "),
])
def test_load_bad_state_file(conn, parent, tmp_path, case, expected):
    state_path = tmp_path / f"{case}.state"
    if case == "fifo":
        os.mkfifo(state_path)
    elif case == "not-a-stream":
        state_path.write_bytes(os.urandom(4096))
    elif case == "truncated":
        _truncated(parent, state_path)
    domain, _seconds = start_child(conn, parent, f"bad-{case}")
    name = domain.name()
    with pytest.raises(fork.ForkError) as error:
        fork.load_device_state(domain, str(state_path), timeout=STATE_TIMEOUT)
    print(f"fork {case}: {error.value}")
    assert expected in error.value.message
    assert error.value.where == name
    assert name not in active_names(conn), "the failed child still runs"
