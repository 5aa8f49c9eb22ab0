"""Instant clones of the real Debian image: one pool per method, two children each.

The parents boot the full Debian image under TCG (a minute or more each), so this is
marked slow. Everything is read from inside the guests over `labctl ssh`: what the
tiny-image tests cannot show is that ClonePrep works on a systemd and cloud-init guest
(sshd serving the new key, cloud-init's instance renamed, users inherited).
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_labctl, unique_name

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

APPLY_TIMEOUT = 1800


def describe(result) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_debian_instant_children(make_inventory):
    prefix = unique_name("d")
    pools = {
        method: {"image": "debian12", "clone": "instant", "instant": {"method": method},
                 "size": 2, "naming": f"{prefix}{method[0]}{{n}}", "network": "lab",
                 "hardware": {"memory": "512MiB"},
                 "identity": {"users": [{"name": "student", "sudo": True}]}}
        for method in ("fork", "restore")
    }
    path = make_inventory(pools, images={"debian12": {"build": "debian12"}})

    result = run_labctl("apply", str(path), timeout=APPLY_TIMEOUT)
    assert result.returncode == 0, describe(result)
    status = json.loads(run_labctl("status", str(path), "-o", "json", check=True).stdout)
    desktops = {d["name"]: d for pool in status["pools"] for d in pool["desktops"]}
    assert len(desktops) == 4, f"expected 4 children, status lists {sorted(desktops)}"
    assert {p["method"] for p in status["parents"]} == {"fork", "restore"}, status["parents"]

    seen: dict[str, list[str]] = {"mac": [], "machine_id": [], "host_key": []}
    for name, desktop in sorted(desktops.items()):
        probe = ("hostname; cat /etc/machine-id /sys/class/net/eth0/address "
                 "/etc/ssh/ssh_host_ed25519_key.pub /var/lib/cloud/data/instance-id; "
                 "id -un; date +%s; ls /etc/ssh | grep ssh_host_ | tr '\\n' ' '")
        before = time.time()
        answer = run_labctl("ssh", name, "--inventory", str(path), "--", probe, timeout=120)
        after = time.time()
        assert answer.returncode == 0, f"labctl ssh {name}: {describe(answer)}"
        lines = answer.stdout.split("\n")
        hostname, machine_id, mac, host_key, instance, user, clock, key_files = lines[:8]
        assert hostname == name
        assert machine_id == desktop["machine_id"] == desktop["uuid"].replace("-", "")
        assert mac == desktop["mac"], f"{name}: the guest's NIC has {mac}"
        assert host_key.split()[:2] == desktop["ssh_host_key"].split()[:2]
        assert instance.startswith(f"{name}-"), f"{name}: cloud-init instance {instance}"
        assert user == "student", f"{name}: logged in as {user}, not the pool's user"
        # The parent's own host keys were removed before its save: only the child's is left.
        assert key_files.split() == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"], (
            f"{name}: host key files {key_files!r}")
        # The guest read its clock some time during the SSH command, which under load takes
        # seconds, so its reading must fall within the command's span, give or take 2 s.
        assert before - 2 <= int(clock) <= after + 2, (
            f"{name}: guest clock {clock}, host {before:.0f} to {after:.0f}")
        seen["mac"].append(mac)
        seen["machine_id"].append(machine_id)
        seen["host_key"].append(host_key)

    for key, values in seen.items():
        assert len(set(values)) == len(values), f"{key} repeats across children: {values}"
