"""bench/stats.py and bench/hostfacts.py: one percentile, one bootstrap, one machine block for all."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from bench.hostfacts import MACHINE_KEYS, host_facts, iso_utc, loadavg, metadata
from bench.report.sections import host_line
from bench.stats import bootstrap_ci, mean_ci, paired_bootstrap_ci, percentile, summary
from tools.migrate_bench_results import MACHINE, META, migrate

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 99, 100, 101, 250])
@pytest.mark.parametrize("q", [50.0, 90.0, 99.0])
def test_percentile_methods_match_what_each_benchmark_reported(n: int, q: float) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    ordered = sorted(values)
    # the soak / stack-timings / dev-TGI formula, kept so their numbers stay comparable across runs
    assert percentile(values, q, method="nearest") == ordered[min(n - 1, int(q / 100 * n))]
    if q == 50.0:
        assert percentile(values, q, method="nearest") == ordered[n // 2]  # stack-timings' p50


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    assert math.isnan(percentile([], 99, method="nearest"))
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 150.0)


def test_summary_shape() -> None:
    s = summary([1.0, 2.0, 3.0, 4.0])
    assert s == {"n": 4, "p50": 2.5, "p99": pytest.approx(3.97), "mean": 2.5}
    assert summary([])["n"] == 0 and math.isnan(summary([])["p50"])


def test_paired_bootstrap_is_the_bootstrap_of_the_differences() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.6, 0.1, 80)
    b = a - 0.05 + rng.normal(0, 0.01, 80)
    low, high = paired_bootstrap_ci(a, b, seed=4)
    assert (low, high) == bootstrap_ci(a - b, seed=4)
    assert low < float(np.mean(a - b)) < high and low > 0
    with pytest.raises(ValueError, match="differ in size"):
        paired_bootstrap_ci(a, b[:-1])


def test_mean_ci_single_value_is_its_own_interval() -> None:
    assert mean_ci([0.5]) == (0.5, (0.5, 0.5))
    mean, (low, high) = mean_ci([0.0, 1.0, 1.0, 0.0, 1.0])
    assert mean == 0.6 and 0.0 <= low < mean < high <= 1.0
    with pytest.raises(ValueError):
        mean_ci([])


def test_host_facts_has_exactly_the_documented_keys() -> None:
    facts = host_facts(loadavg_start=[1.0, 2.0, 3.0])
    assert tuple(facts) == MACHINE_KEYS == MACHINE
    assert isinstance(facts["nproc"], int) and facts["nproc"] >= 1
    assert facts["ram_gib"] > 0 and facts["python"].count(".") == 2
    assert facts["loadavg_start"] == [1.0, 2.0, 3.0] and facts["loadavg_end"] is None
    assert facts["dirty"] is None or facts["dirty"] == bool(facts["dirty_files"])
    assert len(loadavg()) == 3


def test_metadata_keys_and_utc_timestamp() -> None:
    meta = metadata("soak", command="python -m bench.soak", started_at=0.0, wall_s=1.5)
    assert tuple(meta) == META
    assert meta["started_at"] == "1970-01-01T00:00:00Z" == iso_utc(0.0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", iso_utc(1.8e9))


def test_host_line_marks_a_dirty_tree() -> None:
    m = {"nproc": 2, "cpu": "AMD EPYC", "ram_gib": 23.5, "python": "3.11.7", "commit": "abc1234"}
    assert host_line(m) == "2 cores (AMD EPYC), 23.5 GiB RAM, Python 3.11.7, commit `abc1234`"
    assert host_line({**m, "dirty": True}).endswith("`abc1234`, dirty")


def test_migration_reads_the_old_soak_shape() -> None:
    old = {
        "benchmark": "soak",
        "command": "python -m bench.soak",
        "machine": {"cpus": 2, "cpu_model": "X", "mem_gib": 23.5, "platform": "L", "python": "3.11.7",
                    "load_avg_at_start": [6.89, 6.03, 5.52]},
        "sent": 10,
        "wall_s": 440.2,
    }  # fmt: skip
    new = migrate(Path("soak.json"), old)
    assert list(new) == [*META, "machine", "sent"]
    assert new["machine"]["nproc"] == 2 and new["machine"]["ram_gib"] == 23.5
    assert new["machine"]["loadavg_end"] == [6.89, 6.03, 5.52] and new["machine"]["commit"] is None
    assert new["wall_s"] == 440.2 and new["started_at"] is None


def test_every_committed_result_is_in_the_current_shape() -> None:
    # gpu-*.json are written on the GPU host, which has no checkout: they carry the GPU's own block
    files = [p for p in sorted(RESULTS.rglob("*.json")) if not p.name.startswith("gpu-")]
    assert len(files) > 20
    for path in files:
        data = json.loads(path.read_text())
        assert set(META) <= set(data), path
        assert tuple(data["machine"]) == MACHINE_KEYS, path
        assert migrate(path, data) == data, path
