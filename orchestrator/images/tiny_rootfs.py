"""The root file system of the tiny image's initramfs, assembled in a directory.

The tree contains busybox with its applet links, qemu-ga, dropbear and its key tools with
their shared libraries, the kernel modules listed in ``/etc/labctl-tiny/modules`` in load
order, the shipped /init, and the few /etc files that dropbear and glibc read.
"""

from __future__ import annotations

import logging
import subprocess
from importlib import resources
from pathlib import Path

from orchestrator.errors import ImageError
from orchestrator.images import host_binaries
from orchestrator.images.kernel import ModuleTree

log = logging.getLogger(__name__)

# Programs copied from the host: (command, Debian package, path inside the guest).
PROGRAMS = (
    ("qemu-ga", "qemu-guest-agent", "usr/sbin/qemu-ga"),
    ("dropbear", "dropbear-bin", "usr/sbin/dropbear"),
    ("dropbearconvert", "dropbear-bin", "usr/bin/dropbearconvert"),
    ("dropbearkey", "dropbear-bin", "usr/bin/dropbearkey"),
)
BUSYBOX = ("busybox", "busybox-static", "bin/busybox")

# Shipped shell scripts: package data file -> path inside the guest.
SCRIPTS = {
    "tiny_init.sh": "init",
    "tiny_udhcpc.sh": "etc/udhcpc/default.script",
    "tiny_shutdown.sh": "sbin/shutdown",
    "tiny_host_key.sh": "sbin/labctl-install-host-key",
}

DIRECTORIES = ("proc", "sys", "dev", "run", "tmp", "data", "root", "var", "etc/labctl-tiny")

# The account files dropbear needs to accept a key login as root. The "*" password
# field locks password logins without marking the account locked ("!"), which dropbear
# would treat as a reason to reject keys too.
ETC_FILES = {
    "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
    "etc/group": ("root:x:0:\ntty:x:5:\n", 0o644),
    "etc/shadow": ("root:*:1:0:99999:7:::\n", 0o600),
    "etc/shells": ("/bin/sh\n", 0o644),
    "etc/nsswitch.conf": ("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n", 0o644),
}

MODULES_DIR = "lib/modules/labctl"
MODULE_LIST = "etc/labctl-tiny/modules"


def script_text(name: str) -> str:
    """Return the text of a shipped script (package data of orchestrator.images)."""
    return resources.files("orchestrator.images").joinpath(name).read_text()


def _busybox_applets(busybox: Path) -> list[str]:
    try:
        result = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        )
    except subprocess.CalledProcessError as exc:
        raise ImageError(
            f"busybox --list-full failed: {exc.stderr.strip()}", where=str(busybox)
        ) from exc
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def install_busybox(root: Path) -> int:
    """Copy busybox, link each applet at its usual path and return the number of links."""
    command, package, destination = BUSYBOX
    busybox = host_binaries.find_program(command, package)
    if host_binaries.shared_libraries(busybox):
        raise ImageError(
            "busybox on this host is dynamically linked, but the tiny image needs the static build",
            where=str(busybox),
            fix="apt-get install busybox-static",
        )
    host_binaries.install_program(busybox, root, destination)
    count = 0
    for applet in _busybox_applets(busybox):
        link = root / applet
        if link.exists() or link.is_symlink() or applet == destination:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/" + destination)
        count += 1
    return count


def install_programs(root: Path) -> None:
    for command, package, destination in PROGRAMS:
        program = host_binaries.find_program(command, package)
        host_binaries.install_program(program, root, destination)


def install_modules(root: Path, tree: ModuleTree, order: list[str]) -> None:
    """Store the modules uncompressed and write their load order for /init."""
    names = tree.install(order, root / MODULES_DIR)
    (root / MODULE_LIST).write_text("".join(f"{name}\n" for name in names))


def install_etc(root: Path) -> None:
    for relative, (text, mode) in ETC_FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    (root / "var" / "run").symlink_to("/run")
    (root / "etc" / "mtab").symlink_to("/proc/mounts")
    # busybox acpid runs CONFDIR/PWRF/00000080 when the power button is pressed, and
    # /sbin/shutdown without arguments powers the guest off.
    power_button = root / "etc" / "acpi" / "PWRF" / "00000080"
    power_button.parent.mkdir(parents=True)
    power_button.symlink_to("/sbin/shutdown")


def install_scripts(root: Path) -> None:
    for name, relative in SCRIPTS.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_text(script_text(name))
        path.chmod(0o755)


def assemble(root: Path, tree: ModuleTree, module_order: list[str]) -> None:
    """Fill the empty directory ``root`` with the tiny image's whole initramfs tree."""
    for directory in DIRECTORIES:
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "root").chmod(0o700)
    (root / "tmp").chmod(0o1777)
    links = install_busybox(root)
    install_programs(root)
    install_modules(root, tree, module_order)
    install_etc(root)
    install_scripts(root)
    log.debug("initramfs tree ready: %d busybox applets, %d modules", links, len(module_order))
