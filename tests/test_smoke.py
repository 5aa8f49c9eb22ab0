"""The smoke path: one throw-away linked clone built, booted, read back and removed."""

from __future__ import annotations

import json

import pytest
from conftest import run_labctl


def _leftovers(conn, name: str) -> list[str]:
    found = [domain.name() for domain in conn.listAllDomains(0) if domain.name() == name]
    for pool in conn.listAllStoragePools(0):
        if pool.isActive():
            pool.refresh(0)
            found += [volume.name() for volume in pool.listAllVolumes(0) if name in volume.name()]
    return found


def _smoke(conn, image: str, memory: str) -> dict:
    result = run_labctl("smoke", image, "--memory", memory, "-o", "json")
    assert result.returncode == 0, f"smoke failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["event"] == "result"
    assert report["hostname"] == report["desktop"]
    assert len(report["machine_id"]) == 32
    assert report["accelerator"] in ("kvm", "tcg")
    assert _leftovers(conn, report["desktop"]) == [], "smoke left volumes or a domain behind"
    return report


@pytest.mark.libvirt
def test_smoke_tiny_image(conn, tiny_image):
    report = _smoke(conn, "tiny", "128")
    assert report["timings"]["agent"] > 0


@pytest.mark.slow
@pytest.mark.libvirt
def test_smoke_debian_image(conn, debian_image):
    report = _smoke(conn, "debian12", "512")
    assert report["timings"]["boot_to_ready"] > report["timings"]["agent"]
