"""Render a loaded inventory's desktops as provisioning would, and parse every value back.

``check_inventory_renders`` builds each desktop's request with the planner's own code
and runs the provisioning identity step with a stand-in host (no libvirt). Then it
renders the NoCloud seed and the domain, volume and storage pool XML, parses them with
yaml.safe_load and xml.etree, and asserts that every value comes back exactly as the
inventory gave it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import yaml

from orchestrator import render
from orchestrator.domain import DiskLayer, render_domain
from orchestrator.identity.desktop import build_seed
from orchestrator.identity.keys import KeyPair
from orchestrator.inventory import Inventory
from orchestrator.plan import desktop_requests
from orchestrator.provision.desktop import Provisioning, os_volume_name, seed_volume_name
from orchestrator.provision.request import DesktopRequest
from orchestrator.pools import sizing
from orchestrator.state import metadata
from orchestrator.storage.pool import volume_xml
from orchestrator.storage.replica import Replica

ACCESS_KEY = KeyPair(
    private="not a real key",
    public="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAsXFunclld4td10BFg26PQy/4QNsn69so7DdOIVZAE lab",
)


def check_inventory_renders(inventory: Inventory) -> None:
    """Render every desktop of ``inventory`` and check that each value round-trips."""
    layouts = sizing.layout(inventory, {}, set())
    requests = desktop_requests(inventory, dict.fromkeys(inventory.images), {}, layouts)
    assert len(requests) == sum(pool.size for pool in inventory.pools.values())
    for request in requests:
        host = inventory.hosts[request.host]
        prov = provisioning(request, host.storage.path)
        check_seed(prov)
        check_domain(prov)
        check_volume(prov)
        check_pool(host.storage.pool, host.storage.path)


def provisioning(request: DesktopRequest, storage_path: str) -> Provisioning:
    """The real provisioning steps' state for ``request``, without a libvirt host."""
    ctx = SimpleNamespace(
        domain_type="qemu", emulator="/usr/bin/qemu-system-x86_64",
        settings=SimpleNamespace(tcg_cache_mib=256),
        allocator=SimpleNamespace(mac=lambda: "52:54:00:4a:7a:01", ssh_port=lambda: 22001),
    )
    prov = Provisioning(ctx=ctx, request=request, access_key=ACCESS_KEY, on_event=print)
    prov.replica = Replica(DiskLayer(f"{storage_path}/labctl-replica-0123.qcow2", "qcow2"))
    prov.os_disk = f"{storage_path}/{os_volume_name(request.name)}"
    prov.seed = f"{storage_path}/{seed_volume_name(request.name)}"
    prov.make_identity()
    return prov


def check_seed(prov: Provisioning) -> None:
    identity = prov.identity
    files = {item.path: item.data for item in build_seed(identity).files}
    user_data = yaml.safe_load(files["user-data"])
    meta_data = yaml.safe_load(files["meta-data"])
    assert meta_data == {"instance-id": identity.instance_id,
                         "local-hostname": identity.hostname}
    assert (user_data["hostname"], user_data["fqdn"]) == (identity.hostname, identity.fqdn)
    assert user_data.get("runcmd", []) == list(prov.request.run_once)
    users = [{"name": user["name"], "shell": user["shell"],
              "keys": user["ssh_authorized_keys"], "passwd": user.get("passwd", "")}
             for user in user_data["users"]]
    assert users == [{"name": user.name, "shell": user.shell,
                      "keys": list(user.ssh_authorized_keys), "passwd": user.password_hash}
                     for user in identity.users]


def check_domain(prov: Provisioning) -> None:
    record = prov.build_record()
    domain = ET.fromstring(render_domain(prov.domain_spec(record)))
    assert domain.findtext("name") == prov.request.name
    sources = [disk.find("source").get("file") for disk in domain.iter("disk")]
    assert sources == [prov.os_disk, prov.seed]
    backing = domain.find("devices/disk/backingStore/source")
    if prov.request.clone == "linked":
        assert backing.get("file") == prov.replica.disk.path
    nics = [(nic.get("type"), nic.find("source").attrib) for nic in domain.iter("interface")]
    if prov.request.network.mode in ("network", "bridge"):
        mode = prov.request.network.mode
        assert nics == [(mode, {mode: prov.request.network.source})]
    stored = domain.find("metadata/{urn:labctl:desktop:1}desktop")
    assert metadata.from_xml(ET.tostring(stored, encoding="unicode")) == record


def check_volume(prov: Provisioning) -> None:
    name = os_volume_name(prov.request.name)
    volume = ET.fromstring(volume_xml(name, 1 << 30, "qcow2", backing=prov.replica.disk))
    assert volume.findtext("name") == name
    assert volume.findtext("backingStore/path") == prov.replica.disk.path


def check_pool(name: str, path: str) -> None:
    pool = ET.fromstring(render.render("pool.xml.j2", name=name, path=path))
    assert pool.findtext("name") == name
    assert pool.findtext("target/path") == path
