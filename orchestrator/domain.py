"""Domain XML for a desktop: the spec labctl fills in and its rendering through templates/."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from orchestrator import render

DEFAULT_EMULATOR = "/usr/bin/qemu-system-x86_64"


@dataclass(frozen=True)
class DiskLayer:
    path: str
    format: str


@dataclass(frozen=True)
class Disk:
    """A virtio disk; ``backing`` lists the layers below ``path``, nearest first."""

    path: str
    format: str
    target: str
    backing: tuple[DiskLayer, ...] = ()
    readonly: bool = False
    serial: str = ""


@dataclass(frozen=True)
class Interface:
    """A NIC that libvirt manages: ``type`` is "network" or "bridge", ``source`` its name."""

    type: str
    source: str
    mac: str


@dataclass(frozen=True)
class DirectBoot:
    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class UserNetwork:
    """QEMU user networking, restricted (no route out), with SSH forwarded on 127.0.0.1.

    libvirt 9.0 silently drops <portForward> on <interface type='user'>, so this NIC is
    passed as QEMU arguments; libvirt does not list it in domiflist.
    """

    mac: str
    ssh_port: int
    netdev_id: str = "labnet0"
    # An explicit slot: QEMU would otherwise place this device on the first free slot
    # before libvirt's own devices take theirs, and the start fails.
    pci_slot: str = "0x1e"

    def qemu_args(self) -> list[str]:
        netdev = f"user,id={self.netdev_id},restrict=on,ipv6=off"
        if self.ssh_port:
            netdev += f",hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
        device = (f"virtio-net-pci,netdev={self.netdev_id},mac={self.mac},bus=pci.0,"
                  f"addr={self.pci_slot}")
        return ["-netdev", netdev, "-device", device]


@dataclass(frozen=True)
class DomainSpec:
    """Everything domain.xml.j2 needs; the rendered XML is the desktop's definition."""

    name: str
    uuid: str
    domain_type: str
    memory_kib: int
    vcpus: int
    disks: tuple[Disk, ...]
    metadata_xml: str
    title: str = ""
    genid: str = ""
    boot: DirectBoot | None = None
    interfaces: tuple[Interface, ...] = ()
    user_network: UserNetwork | None = None
    console_log: str = ""
    agent: bool = True
    machine: str = "pc"
    emulator: str = DEFAULT_EMULATOR
    extra_qemu_args: tuple[str, ...] = field(default=())
    # False: QEMU does not mark guest RAM mergeable, so KSM never shares its pages.
    share_pages: bool = True
    # TCG only: size of QEMU's translated-code cache; 0 keeps QEMU's default of 1 GiB.
    tcg_cache_mib: int = 0

    def qemu_args(self) -> list[str]:
        args = list(self.user_network.qemu_args()) if self.user_network else []
        return args + list(self.extra_qemu_args)


def render_domain(spec: DomainSpec) -> str:
    """Return the domain XML for ``spec``."""
    return render.render(
        "domain.xml.j2",
        name=spec.name,
        uuid=spec.uuid,
        genid=spec.genid,
        title=spec.title or spec.name,
        metadata_xml=spec.metadata_xml,
        domain_type=spec.domain_type,
        memory_kib=spec.memory_kib,
        vcpus=spec.vcpus,
        machine=spec.machine,
        boot=spec.boot,
        disks=spec.disks,
        interfaces=spec.interfaces,
        console_log=spec.console_log,
        agent=spec.agent,
        emulator=spec.emulator,
        qemu_args=spec.qemu_args(),
        share_pages=spec.share_pages,
        tcg_cache_mib=spec.tcg_cache_mib,
    )


def local_emulator() -> str:
    """Return the QEMU binary path on this machine (the default when none is found)."""
    return shutil.which("qemu-system-x86_64") or DEFAULT_EMULATOR
