"""Shared fixtures: libvirt on qemu:///system, cached images, throw-away inventories.

Tests that boot guests use the real libvirtd and real images from the catalog
(built once, then reused from the cache outside the checkout). Every inventory a
test writes gets a unique name, so parallel workers never touch each other's
desktops, and it is destroyed when the test ends, whatever happened.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
import yaml

from orchestrator.hosts.connection import open_connection
from orchestrator.images import recipes

URI = os.environ.get("LABCTL_TEST_URI", "qemu:///system")
TEST_POOL = "labctl-test"
TEST_POOL_PATH = "/var/lib/labctl/test-pool"
REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked disruptive unless the -m expression names them.

    They restart libvirtd, which closes every other test's libvirt connection, so a run
    of some test files next to other developers' runs must not start them by accident.
    scripts/test runs them alone after the parallel run.
    """
    if "disruptive" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="restarts libvirtd; select it with -m disruptive")
    for item in items:
        if "disruptive" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def conn() -> libvirt.virConnect:
    """A connection to the test libvirtd; a missing libvirtd fails the test (CI starts it)."""
    connection = open_connection(URI)
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def tiny_image():
    return recipes.ensure("tiny")


@pytest.fixture(scope="session")
def debian_image():
    return recipes.ensure("debian12")


def run_labctl(*args: str, check: bool = False, timeout: float = 1800,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the labctl CLI in a subprocess, as a user would; returns the completed process.

    ``env`` adds variables to this process's environment for the run.
    """
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"labctl {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


# Attempts and pause (seconds) of a test's final destroy: another test may restart
# libvirtd, which then drops connections and refuses new ones for a few seconds.
DESTROY_ATTEMPTS = 4
DESTROY_PAUSE = 10


def destroy_inventory(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``labctl destroy`` on ``path``, again after a pause while it fails."""
    for _attempt in range(DESTROY_ATTEMPTS):
        result = run_labctl("destroy", str(path), env=env)
        if result.returncode == 0:
            return result
        time.sleep(DESTROY_PAUSE)
    return result


def unique_name(prefix: str) -> str:
    """A short unique name (desktop names are limited to 15 characters)."""
    return f"{prefix}{secrets.token_hex(2)}"


@pytest.fixture
def make_inventory(tmp_path: Path, conn):
    """Write inventories for a test and destroy their desktops afterwards.

    ``make_inventory(pools, **top)`` returns the file's path. The inventory gets a
    unique name and the host ``local`` on the test URI with the test storage pool.
    """
    written: list[Path] = []

    def make(pools: dict, *, name: str | None = None, images: dict | None = None,
             networks: dict | None = None, hosts: dict | None = None, **top) -> Path:
        document = {
            "name": name or unique_name("t"),
            "hosts": hosts or {"local": {"uri": URI, "storage": {"pool": TEST_POOL,
                                                                   "path": TEST_POOL_PATH}}},
            "images": images or {"tiny": {"build": "tiny"}},
            "networks": networks or {"lab": {"mode": "user"}},
            "pools": pools,
            **top,
        }
        path = tmp_path / f"{document['name']}-{len(written)}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        written.append(path)
        return path

    yield make
    for path in written:
        destroy_inventory(path)
