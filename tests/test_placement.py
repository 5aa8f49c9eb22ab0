"""Storage placement of new desktops over pools.NAME.storage, and its inventory checks."""

from __future__ import annotations

import dataclasses

from test_inventory import at, load_error, load_text, pool_yaml

from orchestrator.plan import _placeholder
from orchestrator.provision.request import DesktopRequest
from orchestrator.state.metadata import DesktopRecord
from orchestrator.storage import placement

HOSTS = ("hosts:\n  local:\n    uri: qemu:///system\n"
         "    storage_pools: [{pool: fast, path: /srv/fast}]\n")
PATHS = {"labctl": "/var/lib/labctl/pool", "fast": "/srv/fast"}


def request(name: str) -> DesktopRequest:
    return DesktopRequest(name=name, inventory="inv", pool="lab", index=1, clone="linked",
                          image=_placeholder("img"), host="local")


def record(disk: str) -> DesktopRecord:
    return DesktopRecord(inventory="inv", pool="lab", index=1, clone="linked", image="img@1",
                         host="local", hostname="h", fqdn="h", machine_id="m", mac="m",
                         disk=disk)


def test_instant_pool_cannot_spread(tmp_path):
    error = load_error(tmp_path, HOSTS + pool_yaml("storage: [labctl, fast]", clone="instant"))
    assert error.where == at(tmp_path, 15), error
    assert "instant clones stay in host 'local''s own storage pool" in error.message, error
    assert "clone: linked" in error.fix, error


def test_instant_pool_may_name_host_pool(tmp_path):
    pool = load_text(tmp_path, HOSTS + pool_yaml("storage: [labctl]", clone="instant"))
    assert pool.pools["lab"].storage == ["labctl"]


def test_new_desktops_go_to_least_used(tmp_path):
    inventory = load_text(tmp_path, HOSTS + pool_yaml("storage: [labctl, fast]", size="4"))
    observed = {"lab-1": record("/var/lib/labctl/pool/labctl-lab-1-os.qcow2"),
                "lab-2": record("/var/lib/labctl/pool/labctl-lab-2-os.qcow2")}
    names = ["lab-1", "lab-2", "lab-3", "lab-4"]
    placed = placement.place(inventory, PATHS, [request(n) for n in names], observed)
    where = {r.name: r.storage_pool for r in placed}
    assert where["lab-1"] == "labctl", f"an existing desktop moved: {where}"
    assert where["lab-2"] == "labctl", f"an existing desktop moved: {where}"
    assert where["lab-3"] == "fast", where
    assert where["lab-4"] == "fast", where


def test_unlisted_pool_leaves_storage_empty(tmp_path):
    inventory = load_text(tmp_path, HOSTS + pool_yaml())
    placed = placement.place(inventory, PATHS, [request("lab-1")], {})
    assert placed[0].storage_pool == "", "a pool without storage: left the host's own pool"


def test_storage_pool_not_in_config_hash():
    moved = dataclasses.replace(request("a"), storage_pool="fast")
    assert moved.config_hash() == request("a").config_hash(), "a move would make it outdated"
