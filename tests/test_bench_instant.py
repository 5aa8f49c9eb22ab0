"""The pure parts of labctl bench --instant: percentiles, ratios, targets, memory check.

No libvirt: the results are built by hand with known figures, and the command-line
checks fail before labctl connects to a host.
"""

from __future__ import annotations

import math

import pytest
from conftest import run_labctl

from orchestrator import bench_instant as bench
from orchestrator.bench_instant import (
    InstantBenchResult,
    MemorySample,
    MethodFigures,
    Ratio,
)
from orchestrator.errors import HostError, LabctlError

MIB = 1 << 20


def cold_timings(boot: float) -> dict[str, float]:
    return {"storage": 0.1, "define": 0.2, "start": 0.7, "boot_to_ready": boot,
            "agent": 5.0, "disk_bytes": 280000.0, "total": 99.0}


def child_timings(ssh: float, parent_wait: float = 0.0) -> dict[str, float]:
    return {"storage": 0.1, "parent": parent_wait, "clone": 1.0, "cloneprep": 1.5,
            "cloneprep.hostname": 0.2, "nic": 0.3, "verify": 0.1, "ssh": ssh,
            "disk_bytes": 280000.0, "total": 99.0}


def figures(method: str, rows: list[dict[str, float]], memory_mib: tuple[int, int],
            count: int = 2, big: int = 4) -> MethodFigures:
    result = MethodFigures(method)
    result.timings = {f"{method}-{i}": row for i, row in enumerate(rows)}
    result.memory = [MemorySample(desktops=count, pss_bytes=memory_mib[0] * MIB),
                     MemorySample(desktops=big, pss_bytes=memory_mib[1] * MIB)]
    return result


def bench_result(cold_boot: float, child_ssh: float, fork_mib: int,
                 cold_mib: int = 1000) -> InstantBenchResult:
    result = InstantBenchResult(image="tiny@1", memory="128MiB", count=2, big=4)
    result.methods = {
        "linked": figures("linked", [cold_timings(cold_boot)] * 4, (cold_mib // 2, cold_mib)),
        "restore": figures("restore", [child_timings(child_ssh)] * 4, (300, 600)),
        "fork": figures("fork", [child_timings(child_ssh, parent_wait=80.0)] * 4,
                        (fork_mib // 2, fork_mib)),
    }
    return result


def test_percentile_known_values():
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert bench.percentile(values, 0.5) == pytest.approx(10.5), "p50 of 1..20 is 10.5"
    assert bench.percentile(values, 0.95) == pytest.approx(19.05), "p95 of 1..20 is 19.05"
    assert bench.percentile(values, 0.0) == 1.0, "p0 is the minimum"
    assert bench.percentile(values, 1.0) == 20.0, "p100 is the maximum"


def test_percentile_ignores_order():
    assert bench.percentile([9.0, 1.0, 5.0], 0.5) == 5.0, "p50 of an unsorted list"


def test_percentile_single_value():
    assert bench.percentile([3.5], 0.95) == 3.5, "every percentile of one value is that value"


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        bench.percentile([], 0.5)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 1.5)


def test_request_to_ready_steps():
    cold = bench.request_to_ready("linked", cold_timings(60.0))
    assert cold == pytest.approx(61.0), "linked sums storage, define, start, boot_to_ready"
    child = bench.request_to_ready("fork", child_timings(0.5, parent_wait=80.0))
    assert child == pytest.approx(3.5), "instant leaves out the parent wait and sub-steps"
    assert bench.request_to_ready("restore", {}) == 0.0, "missing steps count as 0"


def test_ratios_met():
    result = bench_result(cold_boot=99.0, child_ssh=1.1, fork_mib=250)
    found = {ratio.measure: ratio for ratio in bench.ratios(result)}
    restore = found["cold p50 / restore p50"]
    assert restore.value == pytest.approx(100.0 / 4.1), "cold 100 s over restore 4.1 s"
    assert restore.met, "24x meets >= 20x"
    assert found["cold p50 / fork p50"].met, "24x meets >= 20x"
    share = found["fork memory / cold memory at 4"]
    assert share.value == pytest.approx(0.25), "fork 250 MiB over cold 1000 MiB"
    assert share.met, "25 % meets <= 30 %"


def test_ratios_missed():
    result = bench_result(cold_boot=40.0, child_ssh=1.1, fork_mib=400)
    assert not any(ratio.met for ratio in bench.ratios(result)), (
        "41 s over 4.1 s is 10x, below 20x; 40 % of the memory is above 30 %")


def test_ratio_row_text():
    speedup = bench.ratio_row(Ratio("cold p50 / fork p50", 25.04, 20.0, at_least=True))
    assert speedup == ("cold p50 / fork p50", "25.0x", ">= 20x (met)")
    share = bench.ratio_row(Ratio("fork memory", 0.412, 0.30, at_least=False, percent=True))
    assert share == ("fork memory", "41.2 %", "<= 30 % (missed)")


def test_ratio_zero_denominator():
    result = bench_result(cold_boot=99.0, child_ssh=1.1, fork_mib=250, cold_mib=0)
    share = bench.ratios(result)[2]
    assert math.isinf(share.value), "no cold memory gives an infinite share"
    assert not share.met, "an infinite share misses its target"


def test_memory_total_counts_ram_file_once():
    sample = MemorySample(desktops=4, pss_bytes=600 * MIB, ram_file_pss_bytes=100 * MIB,
                          ram_file_bytes=128 * MIB)
    assert sample.total_bytes == 628 * MIB, "the children's share of the file is replaced"


def test_growth_memory_check():
    samples = [MemorySample(desktops=2, pss_bytes=1000 * MIB),
               MemorySample(desktops=2, pss_bytes=300 * MIB, ram_file_pss_bytes=100 * MIB,
                            ram_file_bytes=128 * MIB)]
    need = bench.growth_memory_bytes(samples, big=4)
    expected = (1000 + 200) * MIB * bench.MEMORY_MARGIN + bench.MEMORY_RESERVE
    assert need == int(expected), "two more desktops at each pool's PSS per desktop"
    bench.check_memory_for_growth(samples, 4, available=need)
    with pytest.raises(HostError, match="--big|MemAvailable"):
        bench.check_memory_for_growth(samples, 4, available=need - 1)


def test_inventory_three_pools():
    document = bench.inventory_document("bench1a2b", "tiny", "128MiB", 3)
    pools = document["pools"]
    assert list(pools) == list(bench.METHODS), "one pool per method, keyed by method"
    assert [pool["size"] for pool in pools.values()] == [3, 3, 3]
    assert pools["fork"]["instant"] == {"method": "fork"}
    assert pools["restore"]["instant"] == {"method": "restore"}
    assert pools["linked"]["clone"] == "linked"
    assert document["defaults"]["hardware"] == {"vcpus": 1, "memory": "128MiB"}


def test_inventory_grows_one_pool():
    document = bench.inventory_document("bench1a2b", "tiny", "128MiB", 3, {"fork": 5})
    sizes = {method: pool["size"] for method, pool in document["pools"].items()}
    assert sizes == {"linked": 3, "restore": 3, "fork": 5}


def test_arguments_checked():
    with pytest.raises(LabctlError, match="--big 1"):
        bench.run_instant_bench("tiny", count=2, big=1)
    with pytest.raises(LabctlError, match="--count 0"):
        bench.run_instant_bench("tiny", count=0, big=1)
    with pytest.raises(LabctlError, match="no default guest memory"):
        bench.run_instant_bench("custom", count=1, big=1)


def test_summary_rows():
    result = bench_result(cold_boot=99.0, child_ssh=1.1, fork_mib=250)
    result.methods["fork"].parent_build_seconds = 42.0
    rows = {measure: (value, target) for measure, value, target in bench.summarize(result)}
    assert rows["linked: request to ready p50 / p95 s (4 desktops)"][0] == "100.00 / 100.00"
    assert rows["fork: parent VM build s"][0] == "42.0"
    assert rows["fork: host memory at 4 desktops MiB"][0] == "250 (62 per desktop)"
    assert rows["cold p50 / fork p50"][1] == ">= 20x (met)"
    data = bench.to_json(result)
    assert data["ratios"][2]["met"] is True, "JSON carries the verdicts"
    assert data["methods"]["fork"]["memory"][1]["total_bytes"] == 250 * MIB


def test_cli_big_needs_instant():
    result = run_labctl("bench", "--big", "3", timeout=60)
    assert result.returncode == 1, f"--big without --instant is an error: {result.stderr}"
    assert "--big applies only with --instant" in result.stderr


def test_cli_instant_checks_count():
    result = run_labctl("bench", "--instant", "--image", "tiny", "--count", "5", "--big", "2",
                        timeout=60)
    assert result.returncode == 1, f"--big below --count is an error: {result.stderr}"
    assert "--big 2 is smaller than --count 5" in result.stderr
