"""Fault injection for tests: small filesystems mounted for libvirtd too, private storage pools,
and a libvirtd restart the way scripts/host-setup starts it.

libvirtd may run in its own mount namespace (scripts/host-setup masks /dev/kvm there),
so a filesystem mounted only in the test's namespace would be invisible to libvirtd and
QEMU. ``shared_filesystem`` mounts one loop device at the same path in both namespaces:
both mounts share one superblock, so a file written on one side is there on the other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import yaml
from conftest import URI, run_labctl, unique_name

from orchestrator.hosts.connection import is_local, open_connection
from orchestrator.hosts.context import HostSettings, open_host
from orchestrator.images.catalog import ImageVersion
from orchestrator.storage import replica

LIBVIRTD_PID_FILE = Path("/run/libvirtd.pid")
# The null device node scripts/host-setup binds over /dev/kvm in libvirtd's namespace.
KVM_MASK = Path("/run/labctl-kvm-mask")
FAULT_ROOT = Path("/var/lib/labctl")
FILLER = "filler"
# Bytes fill() leaves to block-by-block writes after its bulk allocation.
FILL_SLACK = 256 << 10


def libvirtd_pid() -> int:
    return int(LIBVIRTD_PID_FILE.read_text().split()[0])


def can_restart_libvirtd(uri: str) -> str:
    """Return why this test run cannot restart the libvirtd of ``uri``, or ""."""
    if not is_local(uri):
        return f"{uri} is not the local libvirtd"
    if os.geteuid() != 0:
        return "restarting libvirtd needs root"
    if not LIBVIRTD_PID_FILE.exists() and not Path("/run/systemd/system").is_dir():
        return f"{LIBVIRTD_PID_FILE} not found: libvirtd was not started by scripts/host-setup"
    return ""


def libvirtd_namespace_differs(pid: int) -> bool:
    return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


def _in_libvirtd_namespace(pid: int, *argv: str) -> list[str]:
    if not libvirtd_namespace_differs(pid):
        return list(argv)
    return ["nsenter", "-t", str(pid), "-m", "--", *argv]


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def shared_filesystem(size_bytes: int) -> Iterator[Path]:
    """Mount a new ext4 filesystem of ``size_bytes`` for this test and for libvirtd.

    It is mounted at a unique directory under /var/lib/labctl in the test's mount
    namespace and in libvirtd's, and unmounted and deleted afterwards, whatever happened.
    No blocks are reserved for root, so libvirtd (root) fills it like the test does.
    """
    mount = FAULT_ROOT / unique_name("labctl-fault-")
    image = Path(tempfile.mkstemp(prefix="labctl-fault-", suffix=".ext4", dir="/var/tmp")[1])
    # Without the pid file (libvirtd under systemd), libvirtd shares the test's namespace.
    pid = libvirtd_pid() if LIBVIRTD_PID_FILE.exists() else 0
    device = ""
    unmounts: list[list[str]] = []
    try:
        os.truncate(image, size_bytes)
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
        device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                                capture_output=True, text=True).stdout.strip()
        mount.mkdir()
        _run(["mount", device, str(mount)])
        unmounts.append(["umount", str(mount)])
        if pid and libvirtd_namespace_differs(pid):
            _run(_in_libvirtd_namespace(pid, "mount", device, str(mount)))
            unmounts.append(_in_libvirtd_namespace(pid, "umount", str(mount)))
        (mount / "lost+found").rmdir()
        yield mount
    finally:
        for argv in reversed(unmounts):
            _unmount(argv)
        if device:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mount.rmdir()


def _unmount(argv: list[str]) -> None:
    """Unmount, or detach lazily if a QEMU process still has a file there open."""
    if subprocess.run(argv, check=False, capture_output=True).returncode != 0:
        subprocess.run(argv[:-1] + ["-l", argv[-1]], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(filesystem: Path, leave_bytes: int) -> Path:
    """Fill ``filesystem`` with one file so that at most ``leave_bytes`` stay free.

    The bulk is allocated at once. The rest is written block by block, because ext4
    needs blocks for the file's extent tree, and statvfs does not count them in advance.
    """
    filler = filesystem / FILLER
    bulk = free_bytes(filesystem) - leave_bytes - FILL_SLACK
    block = b"\0" * 4096
    with filler.open("wb", buffering=0) as handle:
        if bulk > 0:
            os.posix_fallocate(handle.fileno(), 0, bulk)
            handle.seek(bulk)
        try:
            while free_bytes(filesystem) > leave_bytes:
                handle.write(block)
                os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


class PrivatePool:
    """A libvirt storage pool of one test, with inventories that use it.

    ``inventory()`` writes an inventory on this pool. ``close()`` destroys every
    inventory written, then removes the pool's definition and, unless the directory
    belongs to a shared_filesystem, its volumes and directory.
    """

    def __init__(self, directory: Path, workdir: Path, *, on_filesystem: bool = False):
        self.name = unique_name("labctl-fault-")
        self.path = directory
        self.workdir = workdir
        self.on_filesystem = on_filesystem
        self.inventories: list[Path] = []

    def settings(self) -> HostSettings:
        return HostSettings(name="local", uri=URI, storage_pool=self.name,
                            storage_path=str(self.path))

    def inventory(self, pools: dict, *, images: dict | None = None, host: dict | None = None,
                  name: str | None = None) -> Path:
        """Write an inventory on this pool; the same ``name`` again rewrites that file."""
        name = name or unique_name("f")
        document = {
            "name": name,
            "hosts": {"local": {"uri": URI, "storage": {"pool": self.name,
                                                         "path": str(self.path)},
                                **(host or {})}},
            "images": images or {"tiny": {"build": "tiny"}},
            "networks": {"lab": {"mode": "user"}},
            "pools": pools,
        }
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        if path not in self.inventories:
            self.inventories.append(path)
        return path

    def upload_replica(self, image: ImageVersion) -> replica.Replica:
        """Upload the replica of ``image`` now, as the first desktop on the pool would."""
        ctx = open_host(self.settings(), probe=False)
        try:
            with replica.replica_lock(ctx.pool, image.version):
                return replica.ensure_replica(ctx.pool, image)
        finally:
            ctx.close()

    def files(self) -> list[str]:
        """Return the names in the pool's directory (what libvirt and QEMU wrote there)."""
        if not self.path.is_dir():
            return []
        return sorted(os.listdir(self.path))

    def close(self) -> list[str]:
        """Destroy the inventories and remove the pool; return the problems seen.

        It opens a connection of its own, because a test may have restarted libvirtd
        and so closed the session's connection.
        """
        problems = []
        for path in self.inventories:
            result = run_labctl("destroy", str(path), timeout=300)
            if result.returncode != 0:
                problems.append(f"labctl destroy {path}: {result.stderr.strip()}")
        conn = open_connection(URI)
        try:
            storage = conn.storagePoolLookupByName(self.name)
        except libvirt.libvirtError:
            storage = None
        try:
            if storage is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    storage.destroy()
                storage.undefine()
        finally:
            conn.close()
        if not self.on_filesystem:
            shutil.rmtree(self.path, ignore_errors=True)
        return problems


def restart_libvirtd(timeout: float = 60, down_for: float = 0) -> None:
    """Stop libvirtd with SIGTERM and start it again as scripts/host-setup does.

    A libvirtd that ran in its own mount namespace with /dev/kvm masked is started the
    same way again, and one that systemd runs is restarted through systemctl. Running
    guests survive: the new libvirtd reconnects to them. ``down_for`` seconds pass
    between the stop and the start. Returns once it responds.
    """
    deadline = time.monotonic() + timeout + down_for
    if Path("/run/systemd/system").is_dir():
        _run(["systemctl", "stop", "libvirtd.service"])
        time.sleep(down_for)
        _run(["systemctl", "start", "libvirtd.service"])
    else:
        pid = libvirtd_pid()
        masked = libvirtd_namespace_differs(pid)
        os.kill(pid, signal.SIGTERM)
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, f"libvirtd {pid} did not stop within {timeout} s"
            time.sleep(0.1)
        time.sleep(down_for)
        start_libvirtd(masked)
    while True:
        answered = subprocess.run(["virsh", "-q", "-c", URI, "uri"], check=False,
                                  capture_output=True, timeout=30).returncode == 0
        if answered:
            return
        assert time.monotonic() < deadline, f"libvirtd did not answer within {timeout} s"
        time.sleep(0.5)


def start_libvirtd(masked: bool) -> None:
    """Start libvirtd as a daemon, in a new mount namespace with /dev/kvm masked if
    ``masked``. Its output goes nowhere: a pipe would stay open in the daemon."""
    argv = ["libvirtd", "-d"]
    if masked:
        KVM_MASK.unlink(missing_ok=True)
        os.mknod(KVM_MASK, stat.S_IFCHR | 0o000, os.makedev(1, 3))
        os.chmod(KVM_MASK, 0o000)
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" /dev/kvm && exec libvirtd -d', "labctl-mask", str(KVM_MASK)]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)
