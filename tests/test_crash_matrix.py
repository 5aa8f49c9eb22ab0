"""The crash matrix: labctl killed after a step of each operation, then `labctl apply`.

For every operation (linked, full, instant child by fork and by restore, parent VM
build by fork and by restore, refresh of a linked, a full and a fork desktop) and every
step in LABCTL_CRASH_MATRIX=full, or a subset of steps in CI, a case kills labctl
with SIGKILL right after the step and checks that the next apply converges to the
inventory (the desktop ready, a refreshed one with its old UUID and MAC) and leaves no
orphan. scripts/crash-matrix runs every step and sums the results.

Each operation has one inventory, rewritten per case with a new desktop name, so the
apply deletes the previous case's desktop. Parent builds also get a new pool name per
case, which gives a new parent key and so a new parent VM.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import unique_name
from crashkit import (
    OPERATIONS, CaseResult, Lab, Operation, connection, desktop_problems, pool_document,
    run_case, selected_steps,
)

from orchestrator.state import metadata

pytestmark = pytest.mark.libvirt


@pytest.fixture
def lab(tmp_path) -> Lab:
    name = unique_name("m")
    lab = Lab(tmp_path / f"{name}.yaml", name, unique_name("z"))
    yield lab
    if lab.path.exists():
        destroyed = lab.labctl("destroy", str(lab.path))
        assert destroyed.returncode == 0, f"labctl destroy failed: {destroyed.stderr}"


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
