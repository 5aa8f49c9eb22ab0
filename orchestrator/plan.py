"""plan: compare the inventory's desktops with what libvirt has, and list the actions.

Existing desktops are known only from the labctl metadata in their domains. So a
plan is the same from any machine pointed at the same hosts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from orchestrator.errors import ConflictError, HostError, ImageError, InventoryError
from orchestrator.hosts import facts
from orchestrator.hosts.connection import is_local
from orchestrator.hosts.context import HostContext, HostSettings, open_host
from orchestrator.identity.desktop import UserAccount
from orchestrator.images import catalog, recipes
from orchestrator.images.catalog import ImageVersion
from orchestrator.inventory import Inventory
from orchestrator.inventory.fields import MIB
from orchestrator.instant import fork, parent
from orchestrator.inventory.naming import expand_hostname
from orchestrator.pools import claims, sizing
from orchestrator.pools.sizing import PoolLayout
from orchestrator.provision.request import DesktopRequest, NetworkSpec
from orchestrator.state import events, metadata
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import placement, qemuimg
from orchestrator.storage import pool as storage_pool

log = logging.getLogger(__name__)

# Seconds a desktop may take from start to ready: TCG boots are many times slower.
READY_TIMEOUT = {"kvm": 300.0, "tcg": 1200.0}


@dataclass
class Action:
    """One change: create, delete, update (hardware, in place), start, replace, refresh
    (a free desktop whose overlay grew past refresh_over), outdated or keep."""

    kind: str
    desktop: str
    pool: str
    host: str
    reason: str = ""
    request: DesktopRequest | None = None
    record: DesktopRecord | None = None


@dataclass
class Plan:
    inventory: Inventory
    hosts: dict[str, HostContext]
    actions: list[Action] = field(default_factory=list)
    images_to_build: list[str] = field(default_factory=list)
    # Instant pools whose parent VM apply has to build first: pool -> method.
    parents_to_build: dict[str, str] = field(default_factory=dict)
    # Pools stopped at a provisioning error, with that error, until labctl clear.
    stopped: dict[str, events.PoolError] = field(default_factory=dict)
    layouts: dict[str, PoolLayout] = field(default_factory=dict)

    def of_kind(self, *kinds: str) -> list[Action]:
        return [action for action in self.actions if action.kind in kinds]

    @property
    def changes(self) -> list[Action]:
        return [action for action in self.actions if action.kind != "keep"]

    def close(self) -> None:
        for ctx in self.hosts.values():
            ctx.close()


def host_settings(inventory: Inventory, key: str) -> HostSettings:
    host = inventory.hosts[key]
    return HostSettings(
        name=key, uri=host.uri, accelerator=host.accelerator,
        storage_pool=host.storage.pool, storage_path=host.storage.path,
        max_parallel=host.limits.provisioning, power_parallel=host.limits.power,
        maintenance_parallel=host.limits.maintenance, ksm=host.ksm,
        tcg_cache_mib=host.tcg_cache // MIB, ready_timeout=host.ready_timeout,
        storage_pools={extra.pool: extra.path for extra in host.storage_pools},
    )


def resolve_images(inventory: Inventory, *, build: bool,
                   progress: recipes.Progress | None = None) -> dict[str, ImageVersion | None]:
    """Map each image key to its catalog version; None for a recipe not built yet (plan only)."""
    resolved: dict[str, ImageVersion | None] = {}
    used = {pool.image for pool in inventory.pools.values()}
    for key in sorted(used):
        ref = inventory.images[key]
        where = inventory.where(("images", key))
        try:
            resolved[key] = _resolve_image(key, ref, build=build, progress=progress)
        except ImageError as exc:
            raise ImageError(exc.message, where=f"{where} ({exc.where})" if exc.where else where,
                             fix=exc.fix) from exc
    return resolved


def _resolve_image(key: str, ref, *, build: bool,
                   progress: recipes.Progress | None) -> ImageVersion | None:
    if ref.catalog is not None:
        return catalog.resolve(ref.catalog, ref.version)
    if ref.path is not None:
        qemuimg.backing_chain(ref.path)  # a missing file or broken chain fails here
        if not build:
            return None
        image = catalog.register(key, ref.path, source=f"import:{ref.path}")
        if ref.version and not image.version.startswith(ref.version):
            raise ImageError(f"{ref.path} is version {image.version}, not {ref.version}",
                             fix="update version: in the inventory or use the pinned file")
        return image
    try:
        return catalog.resolve(ref.build, ref.version)
    except ImageError:
        if ref.version or not build:
            if ref.version:
                raise
            return None
    return recipes.build(ref.build, progress=progress)


def check_refresh_over(inventory: Inventory, images: dict[str, ImageVersion | None]) -> None:
    """Raise if a pool's refresh_over is above its desktops' disk size: an overlay never
    grows past the disk it covers, so the refresh would never happen."""
    for key, pool in inventory.pools.items():
        image = images.get(pool.image)
        if pool.refresh_over is None or image is None:
            continue  # an image not built yet: checked once it is
        disk = max(pool.hardware.disk or 0, image.virtual_size)
        if pool.refresh_over <= disk:
            continue
        raise InventoryError(
            f"pools.{key}.refresh_over: {pool.refresh_over >> 20} MiB is more than the "
            f"desktops' disk of {disk >> 20} MiB (image {image.ref}), so the overlay never "
            "grows past it and no desktop is ever refreshed",
            where=inventory.where(("pools", key, "refresh_over")),
            fix=f"use a refresh_over below {disk >> 20}MiB, or a larger hardware.disk",
        )


def desktop_requests(inventory: Inventory, images: dict[str, ImageVersion | None],
                     hosts: dict[str, HostContext],
                     layouts: dict[str, PoolLayout]) -> list[DesktopRequest]:
    """Return a request for every desktop the pools' layouts name, existing or new."""
    requests = []
    for pool_key, pool in inventory.pools.items():
        image = images[pool.image]
        network = _network(inventory, pool.network)
        users = tuple(
            UserAccount(name=user.name, ssh_authorized_keys=tuple(user.ssh_authorized_keys),
                        password_hash=user.password_hash or "", sudo=user.sudo,
                        shell=user.shell)
            for user in pool.identity.users
        )
        ready_timeout = _ready_timeout(hosts.get(pool.host))
        instant, tcg_cache_mib = "", 0
        if pool.clone == "instant" and pool.host in hosts:
            assert pool.instant is not None
            instant = _instant_method(inventory, pool_key, hosts[pool.host])
            tcg_cache_mib = pool.instant.tcg_cache // MIB
        for member in layouts[pool_key].desktops:
            name, number = member.name, member.number
            requests.append(DesktopRequest(
                name=name, inventory=inventory.name, pool=pool_key, index=number,
                clone=pool.clone, image=image or _placeholder(pool.image), host=pool.host,
                vcpus=pool.hardware.vcpus, memory_bytes=pool.hardware.memory,
                disk_bytes=pool.hardware.disk or 0, network=network,
                hostname=expand_hostname(pool.identity.hostname, name, number, pool_key),
                domain=pool.identity.domain or "", users=users,
                timezone=pool.identity.timezone, run_once=tuple(pool.identity.run_once),
                ready_timeout=ready_timeout,
                inventory_path=str(Path(inventory.path).resolve()),
                instant=instant, share_memory=pool.hardware.share_memory,
                tcg_cache_mib=tcg_cache_mib,
            ))
    return requests


def _ready_timeout(ctx: HostContext | None) -> float:
    """Return the host's ready_timeout, or the default for its accelerator (TCG for a host
    that is not connected)."""
    if ctx is None:
        return READY_TIMEOUT["tcg"]
    return ctx.settings.ready_timeout or READY_TIMEOUT[ctx.accelerator]


def check_local_only(inventory: Inventory) -> None:
    """Reject, before connecting anywhere, what works only on this machine's libvirtd:
    instant clones (their save images, RAM files and pipes are local files) and ksm."""
    for pool_key, pool in inventory.pools.items():
        uri = inventory.hosts[pool.host].uri
        if pool.clone == "instant" and not is_local(uri):
            raise InventoryError(
                f"instant clones need the libvirt host to be this machine, but pool "
                f"{pool_key} is on {uri}", where=inventory.where(("pools", pool_key, "clone")),
                fix="run labctl on that host, or use clone: linked for remote hosts",
            )
    for key, host in inventory.hosts.items():
        if host.ksm is not None and not is_local(host.uri):
            raise InventoryError(
                f"ksm: applies only to the local host, but host {key} is {host.uri}",
                where=inventory.where(("hosts", key, "ksm")),
                fix="remove ksm: here and set KSM on that host itself",
            )


def _instant_method(inventory: Inventory, pool_key: str, ctx: HostContext) -> str:
    """Return the method the pool's children are made with on its host: fork falls back
    to restore (with a warning) where it cannot run."""
    pool = inventory.pools[pool_key]
    assert pool.instant is not None
    method = pool.instant.method
    reason = fork.unavailable_reason(ctx.conn) if method == "fork" else None
    if reason:
        log.warning("pool %s: fork is not available on host %s (%s); using restore",
                    pool_key, ctx.settings.name, reason)
        return "restore"
    return method


def _placeholder(name: str) -> ImageVersion:
    """An image version standing in for a recipe that apply will build first."""
    return ImageVersion(name=name, version="unbuilt", sha256="", disk="", format="qcow2",
                        virtual_size=0, actual_size=0, boot=None)


def _network(inventory: Inventory, key: str | None) -> NetworkSpec:
    if key is None:
        return NetworkSpec(name="", mode="none")
    network = inventory.networks[key]
    if network.mode == "user":
        return NetworkSpec(name=key, mode="user")
    if network.mode == "network":
        return NetworkSpec(name=key, mode="network", source=network.network)
    return NetworkSpec(name=key, mode="bridge", source=network.bridge)


def observed_desktops(ctx: HostContext, inventory: str) -> dict[str, tuple[libvirt.virDomain,
                                                                           DesktopRecord]]:
    """Return this inventory's desktops on a host, by name."""
    return metadata.inventory_desktops(ctx.conn, inventory)


def make_plan(inventory: Inventory, *, build_images: bool = False,
              progress: recipes.Progress | None = None,
              grow: dict[str, int] | None = None) -> Plan:
    """Connect to the inventory's hosts and compute the actions that converge them.

    ``grow`` requests more desktops in a pool than its sizing keeps (a checkout that
    found no free desktop), still at most the pool's size.
    """
    used_hosts = sorted({pool.host for pool in inventory.pools.values()})
    check_local_only(inventory)
    hosts: dict[str, HostContext] = {}
    try:
        for key in used_hosts:
            hosts[key] = open_inventory_host(inventory, key)
        images = resolve_images(inventory, build=build_images, progress=progress)
        check_refresh_over(inventory, images)
        observed = {key: observed_desktops(ctx, inventory.name) for key, ctx in hosts.items()}
        records = {name: record for found in observed.values()
                   for name, (_domain, record) in found.items()}
        plan = Plan(inventory, hosts, stopped=events.stopped_pools(inventory.name))
        plan.layouts = sizing.layout(inventory, records, set(plan.stopped), grow)
        requests = desktop_requests(inventory, images, hosts, plan.layouts)
        plan.images_to_build = sorted(key for key, image in images.items() if image is None)
        for key, ctx in hosts.items():
            _check_host(inventory, ctx, [r for r in requests if r.host == key])
            _diff(plan, ctx, [r for r in requests if r.host == key], observed[key])
            _parents_to_build(plan, ctx, [r for r in requests if r.host == key])
        return plan
    except BaseException:
        for ctx in hosts.values():
            ctx.close()
        raise


def open_inventory_host(inventory: Inventory, key: str) -> HostContext:
    """Connect to the inventory's host ``key``; errors point at its uri: line."""
    try:
        return open_host(host_settings(inventory, key))
    except HostError as exc:
        # The same class, so that the controller can detect an unreachable libvirtd.
        raise type(exc)(exc.message, where=f"{inventory.where(('hosts', key, 'uri'))} "
                        f"({exc.where})", fix=exc.fix) from exc


def _check_storage_paths(inventory: Inventory, ctx: HostContext) -> None:
    """Raise if a storage pool that the host already has is in another directory than the
    inventory's path, because the desktops' disks would not go where the file puts them."""
    host = inventory.hosts[ctx.settings.name]
    expected_paths = {host.storage.pool: (host.storage.path, ("storage", "path"))}
    for index, extra in enumerate(host.storage_pools):
        expected_paths[extra.pool] = (extra.path, ("storage_pools", index, "path"))
    for existing in ctx.existing_pools():
        path, key = expected_paths[existing.name()]
        actual = storage_pool.pool_path(existing)
        if os.path.normpath(actual) == os.path.normpath(path):
            continue
        raise InventoryError(
            f"storage pool {existing.name()} already exists on host {ctx.settings.name} "
            f"with its directory at {actual}, not {path}",
            where=inventory.where(("hosts", ctx.settings.name, *key)),
            fix=f"write path: {actual}, or name another storage pool",
        )


def _check_host(inventory: Inventory, ctx: HostContext, requests: list[DesktopRequest]) -> None:
    _check_storage_paths(inventory, ctx)
    if ctx.settings.ksm is not None and not facts.ksm_writable():
        raise InventoryError(
            f"ksm: {str(ctx.settings.ksm).lower()} needs a local host with a writable "
            f"{facts.KSM_DIR}/run, and host {ctx.settings.name} is not one",
            where=inventory.where(("hosts", ctx.settings.name, "ksm")),
            fix="remove ksm: for this host, or run labctl as root on the host itself",
        )
    memory_bytes = int(ctx.conn.getInfo()[1]) * 1024 * 1024
    for request in requests:
        if request.memory_bytes > memory_bytes:
            raise InventoryError(
                f"pool {request.pool} asks for {request.memory_bytes >> 20} MiB of memory per "
                f"desktop but host {ctx.settings.name} has {memory_bytes >> 20} MiB",
                where=inventory.where(("pools", request.pool, "hardware", "memory")),
                fix="lower hardware.memory",
            )
        if request.network.mode == "network":
            try:
                ctx.conn.networkLookupByName(request.network.source)
            except libvirt.libvirtError as exc:
                raise InventoryError(
                    f"libvirt network {request.network.source} does not exist on host "
                    f"{ctx.settings.name}",
                    where=inventory.where(("networks", request.network.name)),
                    fix="create it with virsh net-define, or use mode: user",
                ) from exc
    names = {request.name: request for request in requests}
    for domain in ctx.conn.listAllDomains(0):
        request = names.get(domain.name())
        if request is None:
            continue
        record = metadata.read(domain)
        if record is None and not _exists(domain):
            continue  # removed by another program since the listing
        if record is None or record.inventory != inventory.name:
            owner = "not created by labctl" if record is None else (
                f"a desktop of inventory {record.inventory}")
            raise ConflictError(
                f"desktop name {domain.name()} of pool {request.pool} is taken by an existing "
                f"domain on host {ctx.settings.name} ({owner})",
                where=inventory.where(("pools", request.pool, "naming"))
                if inventory.pools[request.pool].naming else
                inventory.where(("pools", request.pool, "names")),
                fix="change the pool's naming so its names do not collide",
            )


def _exists(domain: libvirt.virDomain) -> bool:
    try:
        domain.info()
    except libvirt.libvirtError:
        return False
    return True


def _diff(plan: Plan, ctx: HostContext, requests: list[DesktopRequest],
          observed: dict[str, tuple[libvirt.virDomain, DesktopRecord]]) -> None:
    _check_same_file(plan.inventory, observed)
    requests = placement.place(plan.inventory, ctx.storage_paths(), requests,
                               {name: record for name, (_d, record) in observed.items()})
    wanted = {request.name for request in requests}
    for request in requests:
        found = observed.get(request.name)
        if found is None:
            plan.actions.append(Action("create", request.name, request.pool, ctx.settings.name,
                                       "missing", request=request))
            continue
        domain, record = found
        plan.actions.append(_hold_stopped(plan, _compare(plan, ctx, domain, request, record)))
    surplus = {name: reason for layout in plan.layouts.values()
               for name, reason in layout.surplus.items()}
    for name, (_domain, record) in sorted(observed.items()):
        if name not in wanted:
            reason = surplus.get(name, "not in the inventory")
            if record.pool in plan.inventory.pools and name not in surplus:
                reason = f"its name does not fit pool {record.pool}'s naming"
            plan.actions.append(Action("delete", name, record.pool, ctx.settings.name,
                                       reason, record=record))


def _hold_stopped(plan: Plan, action: Action) -> Action:
    """Keep a stopped pool's failed desktop as it is: re-creating it is provisioning."""
    if action.kind != "replace" or action.pool not in plan.stopped:
        return action
    action.kind = "keep"
    action.reason = f"{action.reason}; pool stopped at a provisioning error (labctl clear)"
    return action


def _parents_to_build(plan: Plan, ctx: HostContext, requests: list[DesktopRequest]) -> None:
    """Note the instant pools that have no usable parent VM for their configuration."""
    ready = {record.key for _domain, record in
             parent.inventory_parents(ctx.conn, plan.inventory.name) if parent.usable(record)}
    for request in requests:
        if request.clone != "instant" or request.image.version == "unbuilt":
            continue
        if parent.parent_key(request, request.instant, ctx.domain_type) not in ready:
            plan.parents_to_build[request.pool] = request.instant


def _check_same_file(inventory: Inventory, observed: dict) -> None:
    """Refuse to manage desktops that another inventory file with the same name created.

    The inventory's name scopes its desktops, and it defaults to the file's stem, so two
    checkouts' demo.yaml would otherwise delete each other's desktops.
    """
    here = str(Path(inventory.path).resolve())
    for name, (_domain, record) in sorted(observed.items()):
        recorded = record.extra.get("inventory_path", "")
        if recorded and recorded != here:
            raise ConflictError(
                f"inventory name {inventory.name} is already used by {recorded} "
                f"(desktop {name} on this host)",
                where=inventory.where(("name",)),
                fix="give this inventory its own name: key, or run labctl with that file",
            )


def _compare(plan: Plan, ctx: HostContext, domain: libvirt.virDomain, request: DesktopRequest,
             record: DesktopRecord) -> Action:
    def action(kind: str, reason: str) -> Action:
        return Action(kind, request.name, request.pool, ctx.settings.name, reason,
                      request=request, record=record)

    if record.state in claims.BUSY_STATES:
        # NOTE: a release killed with SIGKILL in the middle leaves this state behind;
        # labctl refresh then re-creates the desktop.
        return action("keep", f"{record.state} by a release or refresh that is running")
    if record.state != "ready":
        return action("replace", f"left {record.state} by an interrupted run")
    for path in (record.disk, record.seed):
        try:
            ctx.conn.storageVolLookupByPath(path)
        except libvirt.libvirtError:
            return action("replace", f"its volume {path} is missing")
    if request.image.version != "unbuilt" and record.config_hash != request.config_hash():
        if record.image != request.image.ref:
            return action("outdated", f"image changed: {record.image} -> {request.image.ref}")
        return action("outdated", "clone method, disk, network or identity settings changed")
    if record.extra.get("hardware_hash") != request.hardware_hash():
        return action("update", "vCPUs or memory changed")
    pool = plan.inventory.pools[request.pool]
    if not domain.isActive():
        if pool.power_policy != "always-on":
            return action("keep", f"shut off or suspended (power: {pool.power_policy})")
        return action("start", "shut off")
    grown = overlay_growth(request.name, pool, record)
    if grown:
        return action("refresh", grown)
    return action("keep", "up to date")


def overlay_growth(name: str, pool, record: DesktopRecord) -> str:
    """Return why a free desktop's OS disk overlay needs a refresh, or "" if it does not.

    The actual size qemu-img reports counts the clusters the guest wrote since the
    overlay was made. A desktop in use is left alone; its refresh waits for its release.
    """
    if pool.refresh_over is None or record.clone == "full" or record.session_user:
        return ""
    try:
        actual = qemuimg.info(record.disk).actual_size
    except ImageError as exc:
        log.warning("%s: cannot read the size of its OS disk: %s", name, exc)
        return ""
    if actual <= pool.refresh_over:
        return ""
    return (f"OS disk overlay is {actual >> 20} MiB, over refresh_over "
            f"({pool.refresh_over >> 20} MiB)")
