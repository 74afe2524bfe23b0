"""bench/report (package): aggregation, timelines, headline ratios and the BENCHMARKS.md sections (pure)."""

from __future__ import annotations

import math

import pytest

from bench.report import (
    RequestResult,
    baselines_section,
    calibration_section,
    headline,
    interpolate_at,
    markdown_tables,
    parity_verdict,
    percentile,
    quality_sensitivity,
    replace_section,
    requality,
    sensitivity_lines,
    summaries_to_json,
    summarize,
    timeline,
)


def rec(
    system: str,
    i: int,
    *,
    at: float,
    done: float | None,
    tier: str = "large",
    q: float = 0.5,
    condition: str = "large",
    phase: str = "burst",
    generate_ms: float | None = None,
) -> RequestResult:
    return RequestResult(
        system=system,
        phase=phase,
        request_id=f"r{i}",
        group_id="g",
        arrival_s=at,
        sent_s=at,
        done_s=done,
        ok=done is not None,
        tier=tier,
        condition=condition if done is not None else "failed",
        quality=q if done is not None else 0.0,
        generate_ms=generate_ms,
    )


def test_percentile_interpolates_and_handles_empty() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert math.isnan(percentile([], 50))


def test_summarize_counts_failures_as_losses() -> None:
    records = [
        rec("s", 0, at=0.0, done=1.0, generate_ms=900.0),
        rec("s", 1, at=1.0, done=3.0, tier="small", q=0.3, condition="small_alone", generate_ms=1500.0),
        rec("s", 2, at=2.0, done=None),
        rec("s", 3, at=3.0, done=4.0),
    ]
    s = summarize(records)
    assert (s.requests, s.completed, s.failed) == (4, 3, 1)
    assert s.duration_s == 4.0 and s.throughput_rps == pytest.approx(0.75)
    assert s.offered_rps == pytest.approx(4 / 3)
    assert math.isnan(s.sustained_rps)  # fewer than 5 completions
    assert s.latency_p50_s == 1.0 and s.latency_mean_s == pytest.approx(4 / 3)
    assert s.quality == pytest.approx((0.5 + 0.3 + 0.0 + 0.5) / 4)
    assert s.quality_ci[0] <= s.quality <= s.quality_ci[1]
    assert s.offload_ratio == pytest.approx(1 / 3)
    assert s.conditions == {"failed": 1, "large": 2, "small_alone": 1}
    assert s.overhead_p50_ms == pytest.approx(300.0)  # median of 1000-900 and 2000-1500 ms


def test_summarize_refuses_mixed_or_empty_input() -> None:
    with pytest.raises(ValueError, match="no records"):
        summarize([])
    with pytest.raises(ValueError, match="mix"):
        summarize([rec("a", 0, at=0, done=1), rec("b", 1, at=0, done=1)])


def test_requality_rescores_by_condition() -> None:
    records = [
        rec("s", 0, at=0, done=1, tier="small", condition="small_match", q=0.4),
        rec("s", 1, at=0, done=None),
    ]
    out = requality(records, {"small_match": 0.6, "failed": 0.0})
    assert [r.quality for r in out] == [0.6, 0.0]


def test_timeline_bins_by_arrival_and_completion() -> None:
    records = [
        rec("s", 0, at=0.5, done=1.5, tier="small"),
        rec("s", 1, at=1.0, done=2.5),
        rec("s", 2, at=2.2, done=2.9, tier="small"),
    ]
    rows = timeline(records, bin_s=2.0)
    assert [r["t_s"] for r in rows] == [0.0, 2.0]
    assert rows[0]["offered_rps"] == 1.0 and rows[0]["completed_rps"] == 0.5
    assert rows[0]["offload_ratio"] == 0.5 and rows[1]["offload_ratio"] == 1.0
    assert timeline([], bin_s=1.0) == []


def test_interpolate_at() -> None:
    assert interpolate_at([0.0, 1.0], [0.0, 10.0], 0.25) == 2.5
    assert interpolate_at([1.0, 0.0], [10.0, 0.0], 0.5) == 5.0  # sorted first
    assert math.isnan(interpolate_at([0.0, 1.0], [0.0, 1.0], 2.0))


def _summaries() -> dict[str, dict[str, object]]:
    def s(system: str, phase: str, n: int, span: float, tier: str, q: float) -> object:
        return summarize(
            [
                rec(system, i, at=i * span / n, done=i * span / n + 1.0, tier=tier, q=q, phase=phase)
                for i in range(n)
            ]
        )

    return {
        "saturation": {
            "large-only": s("large-only", "saturation", 10, 10.0, "large", 0.5),
            "echolm": s("echolm", "saturation", 10, 4.0, "small", 0.45),
        },
        "burst": {
            "large-only": s("large-only", "burst", 10, 10.0, "large", 0.5),
            "echolm-load-blind": s("echolm-load-blind", "burst", 10, 10.0, "large", 0.5),
            "echolm": s("echolm", "burst", 10, 10.0, "small", 0.48),
        },
    }


def test_headline_ratios() -> None:
    summaries = _summaries()
    sweep = [
        {"threshold": 0.9, "hit_rate": 0.2, "quality": 0.49},
        {"threshold": 0.7, "hit_rate": 1.0, "quality": 0.3},
    ]
    h = headline(summaries, sweep)  # type: ignore[arg-type]
    assert h["saturation_throughput_gain_vs_large"] == pytest.approx(2.5)  # 10th-90th pct: 2.5 vs 1 req/s
    assert h["saturation_makespan_gain_vs_large"] == pytest.approx(10 / 4.6)  # last done at 3.6 + 1
    assert h["saturation_echolm_quality"] == pytest.approx(0.45)
    assert h["saturation_meets_parity"] is False and h["saturation_parity"] == "no"
    assert h["burst_vs_load_blind"]["quality_delta"] == pytest.approx(-0.02)
    vc = h["vs_semantic_cache"]
    assert vc["cache_quality_at_equal_hit_rate"] == pytest.approx(0.3)  # echolm offloads everything
    assert vc["quality_gain_at_equal_hit_rate"] == pytest.approx(0.18)


def test_sections_render_and_replace_only_between_markers() -> None:
    summaries = _summaries()
    result = {
        "command": "echolm bench fleet --preset small",
        "machine": {
            "nproc": 2,
            "cpu": "AMD EPYC",
            "ram_gib": 23.0,
            "platform": None,
            "python": "3.11",
            "commit": "abc",
            "dirty": None,
            "dirty_files": None,
            "loadavg_start": None,
            "loadavg_end": [1.0, 1.0, 1.0],
        },
        "preset": {"name": "small", "slots": 4, "max_batch_size": 8, "echolm_small": 2},
        "services": {
            "small": {
                "name": "1B",
                "prefill_ms_per_token": 0.005,
                "decode_ms_per_token": 1.9,
                "batch_slowdown": 0.006,
            },
            "large": {
                "name": "8B",
                "prefill_ms_per_token": 0.028,
                "decode_ms_per_token": 7.4,
                "batch_slowdown": 0.005,
            },
            "time_scale": 4.0,
        },
        "semantic_cache_threshold": 0.8,
        "summaries": summaries_to_json(summaries),  # type: ignore[arg-type]
        "headline": headline(summaries),  # type: ignore[arg-type]
        "quality_model": {"large": {"win_rate": 0.5, "source": "definition"}},
        "phases": {"burst": {"description": "b"}, "saturation": {"description": "s"}},
        "wall_s": 600.0,
        "plots": ["docs/plots/fleet-latency-cdf-small.png"],
    }
    body = baselines_section(result)
    assert "| echolm | 2.50 |" in body and "**2.50x**" in body and "fleet-latency-cdf-small" in body
    assert "| system |" in markdown_tables(result)
    low = [
        {"threshold": 0.9, "hit_rate": 0.2, "quality": 0.45},
        {"threshold": 0.7, "hit_rate": 1.0, "quality": 0.3},
    ]
    worse_cache = {**result, "headline": headline(summaries, low), "semantic_cache_sweep": low}  # type: ignore[arg-type]
    assert "at no threshold: its best in the sweep is 0.450 (threshold 0.900" in baselines_section(
        worse_cache
    )
    calibration = {
        "tiers": {
            "8B": {
                "source": "measured: H100",
                "prefill_ms_per_token": 0.03,
                "decode_ms_per_token": 7.4,
                "batch_slowdown": 0.005,
            }
        },
        "emulator_check": {"8B": {"prefill_ms_per_token": 0.031, "decode_ms_per_token": 7.5}},
    }
    section = calibration_section(calibration, result)
    assert "| 8B | measured: H100 |" in section
    assert "| fleet large = 8B x 4 | derived" in section and "| 29.600 |" in section
    text = "head\n<!-- section:baselines:start -->\nold\n<!-- section:baselines:end -->\ntail\n"
    out = replace_section(text, "baselines", "new body")
    assert out == "head\n<!-- section:baselines:start -->\nnew body\n<!-- section:baselines:end -->\ntail\n"
    assert replace_section(out, "baselines", "new body") == out  # idempotent
    with pytest.raises(ValueError, match="markers"):
        replace_section("no markers", "baselines", "x")


def test_sustained_rate_ignores_ramp_and_drain() -> None:
    from bench.report import sustained_rate

    steady = [float(i) for i in range(11)]  # one completion a second
    assert sustained_rate(steady) == pytest.approx(1.0)
    assert sustained_rate([*steady, 100.0]) == pytest.approx(1.0)  # one very long straggler
    assert math.isnan(sustained_rate([1.0, 2.0]))


def test_parity_verdict_reads_the_lower_bound() -> None:
    assert parity_verdict((0.5, 0.6)) == "yes"
    assert parity_verdict((0.45, 0.55)) == "no (CI includes 0.5)"
    assert parity_verdict((0.40, 0.45)) == "no"


def test_quality_sensitivity_rescores_the_cell_exactly() -> None:
    table = {"large": 0.5, "small_alone": 0.3, "small_match": 0.48, "small_related": 0.27, "failed": 0.0}
    sat = "saturation"
    records = [
        # large-only, saturation: done at 0..4 s; 10th-90th pct completions 1 s and 3 s: 2 / 2 s = 1 req/s
        *(rec("large-only", i, at=0.0, done=float(i), phase=sat) for i in range(5)),
        # echolm, saturation: 5 done every 0.5 s (2 / 1 s = 2 req/s) and one failure
        rec("echolm", 0, at=0.0, done=0.0, tier="small", condition="small_match", phase=sat),
        rec("echolm", 1, at=0.0, done=0.5, tier="small", condition="small_match", phase=sat),
        rec("echolm", 2, at=0.0, done=1.0, tier="small", condition="small_alone", phase=sat),
        rec("echolm", 3, at=0.0, done=1.5, tier="large", condition="large", phase=sat),
        rec("echolm", 4, at=0.0, done=2.0, tier="small", condition="small_related", phase=sat),
        rec("echolm", 5, at=0.0, done=None, phase=sat),
        # a system that serves everything under small_match: its win rate is the cell itself
        *(
            rec("echolm-load-blind", i, at=0.0, done=1.0, tier="small", condition="small_match")
            for i in range(4)
        ),
    ]
    sens = quality_sensitivity(records, table, (0.48, 0.50, 0.56))
    assert sens["values"] == [0.48, 0.50, 0.56]
    assert sens["echolm_capacity_gain_vs_large"] == pytest.approx(2.0)
    by_value = {row["value"]: row["systems"] for row in sens["rows"]}
    # echolm: (2 x small_match + 0.3 + 0.5 + 0.27 + 0 for the failure) / 6
    assert by_value[0.48]["echolm"][sat]["quality"] == pytest.approx(2.03 / 6)
    assert by_value[0.56]["echolm"][sat]["quality"] == pytest.approx(2.19 / 6)
    assert all(by_value[v]["echolm"][sat]["parity"].startswith("no") for v in by_value)  # 6 rows: wide CI
    assert all(by_value[v]["large-only"][sat]["quality"] == pytest.approx(0.5) for v in by_value)
    blind = {v: by_value[v]["echolm-load-blind"]["burst"] for v in by_value}
    assert blind[0.48]["quality"] == pytest.approx(0.48) and blind[0.48]["parity"] == "no"
    assert blind[0.50]["parity"] == "yes" and blind[0.56]["parity"] == "yes"  # lower bound = the value
    assert sens["share"]["echolm"][sat] == pytest.approx(1 / 3)
    assert sens["break_even"]["echolm"][sat] == pytest.approx((0.5 - 1.07 / 6) * 3)  # 0.965
    assert sens["break_even"]["echolm-load-blind"]["burst"] == pytest.approx(0.5)
    assert math.isnan(sens["break_even"]["large-only"][sat])
    assert [r.quality for r in records][5 + 5] == 0.0  # the input is not modified (failure: 0)
    body = "\n".join(sensitivity_lines(sens))
    assert "| 0.56 |" in body and "| 2.00x |" in body and "CI lower bound >= 0.5" in body
    assert "0.965" in body and sensitivity_lines(None) == []
