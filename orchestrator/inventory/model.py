"""The validated inventory: hosts, images, networks and pools of desktops (pydantic models).

Models are strict (no type coercion: ``"3"`` is not an integer), reject unknown keys
and are frozen. Sizes (``memory``, ``disk``) are stored as int bytes under their YAML
names. A ``Pool`` already has the inventory's ``defaults:`` merged in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from orchestrator.inventory.fields import (
    MAX_COMMAND_CHARS,
    MIB,
    duration_type,
    AbsolutePath,
    BridgeName,
    Command,
    DesktopName,
    DnsDomain,
    HexVersion,
    HostnamePattern,
    InventoryName,
    Key,
    LibvirtNetworkName,
    LibvirtUri,
    NamingPattern,
    PasswordHash,
    PosixUser,
    ShellPath,
    SshPublicKey,
    StoragePath,
    TimeZone,
    labctl_error,
    size_type,
)
from orchestrator.inventory.naming import MAX_POOL_SIZE, NamingError, check_fits, parse_pattern
from orchestrator.inventory.positions import KeyPath, PositionTable

DEFAULT_HOST = "local"
DEFAULT_URI = "qemu:///system"
DEFAULT_STORAGE_POOL = "labctl"
DEFAULT_STORAGE_PATH = "/var/lib/labctl/pool"
MIN_MEMORY = 64 * MIB
MIN_DISK = 64 * MIB
# NOTE: keep in step with the recipes of labctl's image builder (orchestrator.images).
BUILD_RECIPES = ("debian12", "tiny")

MemorySize = size_type(MIN_MEMORY, "Guest memory.")
DiskSize = size_type(MIN_DISK, "Virtual size of the desktop's disk; default: the image's size.")
TcgCacheSize = size_type(32 * MIB, "TCG translated-code cache.", maximum=2048 * MIB)
RefreshSize = size_type(MIB, "OS disk overlay size that triggers a refresh.")
GraceSeconds = duration_type("Grace period.")
ReadyTimeout = duration_type("Time from a desktop's start to ready.", minimum=1,
                             maximum=86400)


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class StoragePool(StrictModel):
    """The libvirt directory storage pool of a host; labctl creates it at ``path`` if missing."""

    pool: Key = DEFAULT_STORAGE_POOL
    path: StoragePath = DEFAULT_STORAGE_PATH


class Limits(StrictModel):
    """Operations of each class run at once on a host, so a login surge or a recompose
    cannot boot-storm it (Horizon's vCenter concurrency limits)."""

    provisioning: Annotated[int, Field(ge=1, le=64)] = Field(
        2, description="Desktops created, refreshed or recomposed at once."
    )
    power: Annotated[int, Field(ge=1, le=64)] = Field(
        4, description="Starts, shutdowns and managed saves at once."
    )
    maintenance: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="Rebalance moves and other storage maintenance at once."
    )


class Host(StrictModel):
    """A libvirt host that runs desktops."""

    uri: LibvirtUri
    accelerator: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="auto probes KVM with a real boot and falls back to TCG."
    )
    storage: StoragePool = StoragePool()
    storage_pools: list[StoragePool] = Field(
        [], description="More storage pools on this host that pools can spread desktops over "
        "(pools.NAME.storage, labctl rebalance).",
    )
    limits: Limits = Limits()
    tcg_cache: TcgCacheSize = Field(
        256 * MIB, description="Under TCG (no KVM): QEMU's translated-code cache per guest. "
        "QEMU's own default of 1 GiB is mostly resident after a boot, so a smaller cache fits "
        "more guests; larger ones retranslate less.",
    )
    ksm: bool | None = Field(
        None, description="true/false: turn the host's kernel same-page merging on/off at "
        "apply (host-wide; local hosts only). Unset: leave it as it is.",
    )
    ready_timeout: ReadyTimeout | None = Field(
        None, description="Time a desktop may take from its start to ready (guest agent, "
        "identity, SSH login). Unset: 300 under KVM, 1200 under TCG.",
    )


class ImageRef(StrictModel):
    """A golden image: built from a recipe, imported from a file, or already in the catalog."""

    build: Literal[BUILD_RECIPES] | None = Field(  # type: ignore[valid-type]
        None, description="Recipe that labctl builds the image from."
    )
    path: AbsolutePath | None = Field(
        None, description="qcow2 or raw file to import; relative to the inventory file."
    )
    catalog: Key | None = Field(
        None, description="Name of an image in labctl's catalog (labctl image list)."
    )
    version: HexVersion | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImageRef:
        sources = [self.build, self.path, self.catalog]
        if sum(source is not None for source in sources) != 1:
            raise labctl_error(
                "an image needs exactly one of build:, path: or catalog:",
                fix=f"use build: {BUILD_RECIPES[0]}, path: /path/to/golden.qcow2 or "
                "catalog: NAME",
            )
        return self


class UserNetwork(StrictModel):
    """QEMU user networking, restricted (no route out), optional SSH forward on 127.0.0.1."""

    mode: Literal["user"]
    ssh_forward: bool = True


class LibvirtNetwork(StrictModel):
    """An existing libvirt network on the host."""

    mode: Literal["network"]
    network: LibvirtNetworkName


class BridgeNetwork(StrictModel):
    """An existing bridge on the host."""

    mode: Literal["bridge"]
    bridge: BridgeName


Network = Annotated[UserNetwork | LibvirtNetwork | BridgeNetwork, Field(discriminator="mode")]


class Hardware(StrictModel):
    """Virtual hardware of each desktop; ``memory`` and ``disk`` are in bytes."""

    vcpus: Annotated[int, Field(ge=1, le=255)] = 1
    memory: MemorySize = 512 * MIB
    disk: DiskSize | None = None
    share_memory: bool = Field(
        True, description="false: KSM never merges this pool's memory with other guests' "
        "(libvirt nosharepages), closing that side channel; not with instant method fork.",
    )


class InstantOptions(StrictModel):
    """Options of instant clones: the method that makes children from the parent VM."""

    method: Literal["fork", "restore"] = Field(
        "fork", description="fork: QEMU VM templating; restore: libvirt save image per child."
    )
    tcg_cache: TcgCacheSize = Field(
        64 * MIB, description="Under TCG (no KVM): each child's translated-code cache. A "
        "child starts from a booted guest, so it translates far less code than a boot and "
        "gets a smaller cache than hosts.NAME.tcg_cache, which its parent VM boots with.",
    )


class ProvisioningPolicy(StrictModel):
    """When a pool's desktops are made: all up front, or on demand as they are checked out."""

    mode: Literal["up-front", "on-demand"] = Field(
        "up-front", description="up-front: size desktops always exist; on-demand: min "
        "desktops exist and spare ready ones are kept, up to size."
    )
    min: Annotated[int, Field(ge=0, le=MAX_POOL_SIZE)] | None = Field(
        None, description="on-demand: desktops that exist even when nobody uses them "
        "(default 0)."
    )
    spare: Annotated[int, Field(ge=0, le=MAX_POOL_SIZE)] | None = Field(
        None, description="on-demand: ready, unassigned desktops kept for the next checkouts "
        "(default 1)."
    )
    enabled: bool = Field(True, description="false: make no new desktops for this pool.")
    stop_on_error: bool = Field(
        True, description="Stop provisioning the pool at its first error, until "
        "labctl clear POOL (the error is shown by labctl status)."
    )

    @model_validator(mode="after")
    def _on_demand_only(self) -> ProvisioningPolicy:
        if self.mode == "up-front":
            # 0 changes nothing, and lets an up-front pool override defaults: of on-demand ones.
            for key in ("min", "spare"):
                if getattr(self, key) not in (None, 0):
                    raise labctl_error(
                        f"{key} applies only to mode: on-demand (up-front makes every desktop "
                        "at once)",
                        fix=f"remove {key}: or set mode: on-demand",
                        field=key,
                    )
        return self

    @property
    def min_desktops(self) -> int:
        return self.min or 0

    @property
    def spare_desktops(self) -> int:
        return 1 if self.spare is None else self.spare


class AssignmentPolicy(StrictModel):
    """The assignment of desktops to users: any free one (floating) or always the same one
    (dedicated)."""

    type: Literal["floating", "dedicated"] = "floating"
    automatic: bool = Field(
        True, description="dedicated: a user's first checkout assigns a free desktop; "
        "false: only labctl assign gives users desktops."
    )

    @model_validator(mode="after")
    def _automatic_needs_dedicated(self) -> AssignmentPolicy:
        if "automatic" in self.model_fields_set and self.type != "dedicated":
            raise labctl_error(
                "automatic applies only to type: dedicated; a floating desktop goes to "
                "whoever checks it out and is never assigned",
                fix="remove automatic: or set type: dedicated",
                field="automatic",
            )
        return self


class RecomposePolicy(StrictModel):
    """The rules by which labctl recompose moves desktops to a new image version."""

    strategy: Literal["wait-for-logoff", "force"] = Field(
        "wait-for-logoff", description="Desktops in use: recomposed at release "
        "(wait-for-logoff), or after the grace period even if in use (force)."
    )
    grace: GraceSeconds = Field(
        300, description="force: time a desktop in use gets before it is recomposed."
    )
    stop_on_error: bool = Field(True, description="Stop the roll at the first failure.")
    min_ready: Annotated[int, Field(ge=0, le=MAX_POOL_SIZE)] = Field(
        0, description="Ready desktops kept during the roll."
    )

    @model_validator(mode="after")
    def _grace_needs_force(self) -> RecomposePolicy:
        if "grace" in self.model_fields_set and self.strategy != "force":
            raise labctl_error(
                f"grace applies only to strategy: force; with {self.strategy} a desktop in "
                "use is recomposed when its user releases it, however long that takes",
                fix="remove grace: or set strategy: force",
                field="grace",
            )
        return self


class User(StrictModel):
    """A user account created at first boot."""

    name: PosixUser
    ssh_authorized_keys: list[SshPublicKey] = []
    password_hash: PasswordHash | None = None
    sudo: bool = False
    shell: ShellPath = "/bin/bash"


class Identity(StrictModel):
    """Guest identity applied to each desktop (NoCloud seed, or ClonePrep for instant clones)."""

    hostname: HostnamePattern = "{name}"
    domain: DnsDomain | None = None
    timezone: TimeZone = "Etc/UTC"
    users: list[User] = []
    run_once: list[Command] = Field(
        [], description="Commands run once at first boot (cloud-init runcmd)."
    )

    @field_validator("users")
    @classmethod
    def _unique_users(cls, users: list[User]) -> list[User]:
        seen: set[str] = set()
        for user in users:
            if user.name in seen:
                raise labctl_error(f"user {user.name!r} is listed twice", fix="merge the entries")
            seen.add(user.name)
        return users

    @field_validator("run_once")
    @classmethod
    def _run_once_total(cls, commands: list[str]) -> list[str]:
        total = sum(len(command) for command in commands)
        if total > MAX_COMMAND_CHARS:
            raise labctl_error(
                f"run_once commands total {total} characters, more than {MAX_COMMAND_CHARS}",
                fix="put long scripts into the image instead",
            )
        return commands


class Pool(StrictModel):
    """A pool of desktops cloned from one image on one host."""

    image: Key
    clone: Literal["full", "linked", "instant"]
    size: Annotated[int, Field(ge=1, le=MAX_POOL_SIZE)] = Field(
        description="Number of desktops; default with names: the number of names."
    )
    naming: NamingPattern | None = None
    names: list[DesktopName] | None = None
    host: Key = DEFAULT_HOST
    hardware: Hardware = Hardware()
    network: Key | None = Field(None, description="Key of networks:; none: no NIC.")
    instant: InstantOptions | None = Field(None, description="Only with clone: instant.")
    identity: Identity = Identity()
    provisioning: ProvisioningPolicy = ProvisioningPolicy()
    assignment: AssignmentPolicy = AssignmentPolicy()
    logoff: Literal["keep", "refresh", "delete"] = Field(
        "keep", description="What release does to a desktop: keep it as it is, refresh it "
        "to a clean disk, or delete it (floating pools)."
    )
    refresh_over: RefreshSize | None = Field(
        None, description="Refresh a desktop that is not in use once its OS disk overlay "
        "is larger than this."
    )
    power: Literal["always-on", "suspend", "power-off", "none"] | None = Field(
        None, description="full and linked pools: keep free desktops running (always-on, "
        "the default), managed-save them at release (suspend), shut them down (power-off), "
        "or leave them as they are (none)."
    )
    recompose: RecomposePolicy = RecomposePolicy()
    storage: list[Key] = Field(
        [], description="libvirt storage pools of the host to spread the desktops over "
        "(default: the host's storage pool)."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        names = data.get("names")
        if "size" not in data and isinstance(names, list):
            data["size"] = len(names)
        if data.get("clone") == "instant" and "instant" not in data:
            data["instant"] = {}
        return data

    @model_validator(mode="after")
    def _check_pool(self) -> Pool:
        self._check_names()
        self._check_policies()
        if self.instant is not None and self.clone != "instant":
            raise labctl_error(
                f"instant: applies only to clone: instant, but clone is {self.clone}",
                fix="remove instant: or set clone: instant",
                field="instant",
            )
        if (self.instant is not None and self.instant.method == "fork"
                and not self.hardware.share_memory):
            raise labctl_error(
                "instant method fork shares the parent's memory pages with every child by "
                "design, so it cannot honour hardware.share_memory: false",
                fix="use instant: {method: restore} (children then share no pages unless "
                "KSM merges them, which share_memory: false also prevents)",
                field="instant",
            )
        return self

    def _check_policies(self) -> None:
        sizing = self.provisioning
        for key, value in (("min", sizing.min), ("spare", sizing.spare)):
            if value is not None and value > self.size:
                raise labctl_error(
                    f"provisioning.{key} is {value}, more than the pool's size of {self.size} "
                    "(its maximum number of desktops)",
                    fix=f"lower {key}: to at most {self.size} or raise size:",
                    field="provisioning",
                )
        if self.assignment.type == "dedicated" and self.logoff == "delete":
            raise labctl_error(
                "logoff: delete would take a dedicated desktop away from its user",
                fix="use logoff: refresh or keep, or assignment: {type: floating}",
                field="logoff",
            )
        if self.clone == "instant" and self.power not in (None, "always-on"):
            raise labctl_error(
                f"power: {self.power} does not apply to instant clones: a child lives from "
                "its fork until it is refreshed or deleted",
                fix="remove power: (instant clones are always on)",
                field="power",
            )
        if self.clone == "full" and self.refresh_over is not None:
            raise labctl_error(
                "refresh_over measures a linked or instant clone's overlay; a full clone has "
                "none",
                fix="remove refresh_over:, or use clone: linked",
                field="refresh_over",
            )
        if self.recompose.min_ready and self.recompose.min_ready >= self.size:
            # A roll takes a free desktop down at a time, so min_ready must leave one.
            raise labctl_error(
                f"recompose.min_ready is {self.recompose.min_ready}, but the pool's size is "
                f"{self.size}, so a recompose could never take a desktop down",
                fix=f"lower min_ready: to at most {self.size - 1}",
                field="recompose",
            )

    @property
    def power_policy(self) -> str:
        return self.power or "always-on"

    def _check_names(self) -> None:
        if (self.naming is None) == (self.names is None):
            raise labctl_error(
                "a pool needs exactly one of naming: (a pattern) or names: (a list)",
                fix='use naming: "lab-{n}" or names: [a, b, c]',
                field="naming" if self.naming is not None else None,
            )
        if self.naming is not None:
            try:
                check_fits(self.naming, parse_pattern(self.naming), self.size)
            except NamingError as exc:
                raise labctl_error(exc.message, exc.fix, field="naming") from exc
            return
        assert self.names is not None
        if len(self.names) != self.size:
            raise labctl_error(
                f"names: lists {len(self.names)} desktops but size is {self.size}",
                fix="make them agree, or drop size: to use the number of names",
                field="size",
            )
        seen: set[str] = set()
        for name in self.names:
            if name.casefold() in seen:
                raise labctl_error(f"desktop name {name!r} is listed twice", field="names")
            seen.add(name.casefold())


def _default_hosts() -> dict[str, Host]:
    return {DEFAULT_HOST: Host(uri=DEFAULT_URI)}


class Inventory(StrictModel):
    """A loaded and validated inventory."""

    name: InventoryName
    path: Path
    hosts: dict[Key, Host] = Field(default_factory=_default_hosts)
    images: dict[Key, ImageRef] = {}
    networks: dict[Key, Network] = {}
    pools: dict[Key, Pool] = {}
    _positions: PositionTable | None = PrivateAttr(None)

    def where(self, path: KeyPath) -> str:
        """Return the FILE:LINE of a key path such as ``("pools", "lab", "size")``.

        A key that no file spells out (a model default) reports its nearest ancestor.
        """
        if self._positions is None:
            return str(self.path)
        return self._positions.where(path)

    def attach_positions(self, positions: PositionTable) -> None:
        """Record where each key came from; called once by the loader."""
        self._positions = positions
