"""The crash matrix: labctl killed after a step of each operation, then `labctl apply`.

For every operation (linked, full, instant child by fork and by restore, parent VM
build by fork and by restore, refresh of a linked, a full and a fork desktop, a
rebalance move of a linked desktop's disk, a recompose onto another image version)
and every step in LABCTL_CRASH_MATRIX=full, or a subset of steps in CI, a case kills labctl
with SIGKILL right after the step and checks that the next apply (for the
rebalance-again row, the next rebalance) converges to the inventory and leaves no
orphan. Converged means that the desktop is ready. A refreshed, moved or recomposed
desktop also keeps its UUID and MAC, and a recomposed one is on the new image version.
scripts/crash-matrix runs every step and sums the results.

Each operation has one inventory, rewritten per case with a new desktop name, so the
apply deletes the previous case's desktop. Parent builds also get a new pool name per
case, which gives a new parent key and so a new parent VM. Each rebalance row moves
one desktop back and forth between the test storage pool and a storage pool of its
own. The recompose row rolls one desktop between two image versions of its own.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import TEST_POOL, TEST_POOL_PATH, unique_name
from crashkit import (
    OPERATIONS, CaseResult, Lab, Operation, connection, desktop_problems, pool_document,
    run_case, selected_steps,
)
from test_rebalance import remove_storage_pool
from test_recompose import make_version

from orchestrator import paths
from orchestrator.state import metadata

pytestmark = pytest.mark.libvirt


@pytest.fixture
def lab(tmp_path, operation: Operation, request, conn) -> Lab:
    name = unique_name("m")
    lab = Lab(tmp_path / f"{name}.yaml", name, unique_name("z"))
    if operation.command == "rebalance":
        spare = unique_name("cms")
        lab.storage[spare] = f"/var/lib/labctl/{spare}"
    if operation.command == "recompose":
        catalog_name = unique_name("cmi")
        tiny = request.getfixturevalue("tiny_image")
        for _ in range(2):
            version = make_version(tiny, catalog_name, tmp_path)
            lab.versions[version.ref] = version
        lab.images = {"gold": {"catalog": catalog_name, "version": version.version}}
    try:
        yield lab
    finally:
        _remove_lab(lab, conn)


def _remove_lab(lab: Lab, conn) -> None:
    """Destroy the lab's desktops, then its storage pools and image versions."""
    try:
        if lab.path.exists():
            destroyed = lab.labctl("destroy", str(lab.path))
            assert destroyed.returncode == 0, f"labctl destroy failed: {destroyed.stderr}"
    finally:
        for name, path in lab.storage.items():
            remove_storage_pool(conn, name, path)
        if lab.versions:
            catalog_name = lab.images["gold"]["catalog"]
            shutil.rmtree(paths.images_dir() / catalog_name, ignore_errors=True)


def _provisioning_case(lab: Lab, operation: Operation, index: int, step: str) -> CaseResult:
    desktop = f"{lab.prefix}{index}"
    pool = f"p{index}" if operation.in_parent else "lab"

    def before() -> None:
        lab.write({pool: pool_document(operation, [desktop])})

    crash_in = "labctl-parent-*" if operation.in_parent else ""
    return run_case(lab, operation, step, desktop, before, crash_in)


def _delete_case(lab: Lab, operation: Operation, index: int, step: str) -> CaseResult:
    """Apply a desktop, then crash while the next apply deletes it for another one."""
    old, new = f"{lab.prefix}{index}a", f"{lab.prefix}{index}b"

    def before() -> None:
        lab.write({"lab": pool_document(operation, [old])})
        applied = lab.labctl("apply", str(lab.path))
        assert applied.returncode == 0, f"setup apply failed: {applied.stderr}"
        lab.write({"lab": pool_document(operation, [new])})

    return run_case(lab, operation, step, new, before, crash_in=old)


def _refresh_case(lab: Lab, operation: Operation, step: str) -> CaseResult:
    desktop = f"{lab.prefix}1"

    def before() -> tuple[str, str]:
        if not lab.path.exists():
            lab.write({"lab": pool_document(operation, [desktop])})
            applied = lab.labctl("apply", str(lab.path))
            assert applied.returncode == 0, f"setup apply failed: {applied.stderr}"
        assert desktop_problems(desktop) == [], "the desktop to refresh is not ready"
        with connection() as conn:
            domain = conn.lookupByName(desktop)
            record = metadata.read(domain)
            return domain.UUIDString(), record.mac

    return run_case(lab, operation, step, desktop, before)


def _existing_desktop(lab: Lab, operation: Operation, desktop: str,
                      pools: dict) -> tuple[str, str]:
    """Apply ``pools`` the first time; return the ready desktop's UUID and MAC."""
    if not lab.path.exists():
        lab.write(pools)
        applied = lab.labctl("apply", str(lab.path))
        assert applied.returncode == 0, f"setup apply failed: {applied.stderr}"
    assert desktop_problems(desktop) == [], f"the desktop to {operation.command} is not ready"
    with connection() as conn:
        domain = conn.lookupByName(desktop)
        return domain.UUIDString(), metadata.read(domain).mac


def _rebalance_case(lab: Lab, operation: Operation, step: str) -> CaseResult:
    """Crash while rebalance moves the desktop's disk to the storage pool it is not in."""
    desktop = f"{lab.prefix}1"
    document = pool_document(operation, [desktop])

    def before() -> tuple[str, str]:
        identity = _existing_desktop(lab, operation, desktop,
                                     {"lab": document | {"storage": [TEST_POOL]}})
        with connection() as conn:
            disk = metadata.read(conn.lookupByName(desktop)).disk
        [spare] = lab.storage
        target = spare if os.path.dirname(disk) == TEST_POOL_PATH else TEST_POOL
        lab.write({"lab": document | {"storage": [target]}})
        return identity

    return run_case(lab, operation, step, desktop, before)


def _recompose_case(lab: Lab, operation: Operation, step: str) -> CaseResult:
    """Crash while recompose moves the desktop to the image version it is not on."""
    desktop = f"{lab.prefix}1"
    document = pool_document(operation, [desktop]) | {"image": "gold"}

    def before() -> tuple[str, str]:
        identity = _existing_desktop(lab, operation, desktop, {"lab": document})
        with connection() as conn:
            current = metadata.read(conn.lookupByName(desktop)).image
        [target] = [v for ref, v in lab.versions.items() if ref != current]
        lab.images["gold"]["version"] = target.version
        lab.expected_image = target.ref
        lab.write({"lab": document})
        return identity

    return run_case(lab, operation, step, desktop, before)


def _report(result: CaseResult) -> None:
    path = os.environ.get("LABCTL_CRASH_REPORT")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(result.__dict__ | {"passed": result.passed}) + "\n")


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.name for op in OPERATIONS])
def test_crash_after_each_step(operation: Operation, lab: Lab):
    results = []
    for index, step in enumerate(selected_steps(operation), start=1):
        if operation.command == "refresh":
            result = _refresh_case(lab, operation, step)
        elif operation.command == "rebalance":
            result = _rebalance_case(lab, operation, step)
        elif operation.command == "recompose":
            result = _recompose_case(lab, operation, step)
        elif operation.in_previous:
            result = _delete_case(lab, operation, index, step)
        else:
            result = _provisioning_case(lab, operation, index, step)
        _report(result)
        results.append(result)
    failed = [r for r in results if not r.passed]
    report = "\n".join(
        f"{r.operation} after {r.step}: killed={r.killed} converged={r.converged} "
        f"orphans={r.orphans} problems={r.problems}" for r in failed)
    assert not failed, f"{len(failed)} of {len(results)} crash cases failed:\n{report}"
