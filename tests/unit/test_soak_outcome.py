"""``bench.soak.soak_outcome``: the soak's measured summary and pass verdict, from a hand-built tally."""

from __future__ import annotations

from typing import Any

from bench.soak import GROUP_TOPICS, SoakConfig, SoakTally, soak_outcome

KEYS = [
    "phases_s", "sent", "answered", "missing", "errors", "client_duplicates_dropped", "max_lag",
    "lag_zero_after_burst_s", "rss", "latency", "verdict", "passed", "samples",
]  # fmt: skip
CONFIG = SoakConfig(steady_s=20.0, warmup_s=4.0, rss_growth_mb=10.0)


def _sample(t: float, rss: dict[str, float], lag: int = 0) -> dict[str, Any]:
    return {"t": t, "lag": dict.fromkeys(GROUP_TOPICS, lag), "rss_mb": rss}


def _tally(*, answered: int = 3, errors: dict[str, int] | None = None) -> SoakTally:
    # steady 0..20 s (judged from 4 s, second half from 12 s), burst 20..25 s
    samples = [
        _sample(0.0, {"worker-0": 100.0, "worker-1": 100.0}),
        _sample(4.0, {"worker-0": 200.0, "worker-1": 200.0}, lag=7),
        _sample(12.0, {"worker-0": 203.0, "worker-1": 230.0}, lag=2),
        _sample(20.0, {"worker-0": 205.0, "worker-1": 260.0}),
        _sample(26.0, {"worker-0": 300.0, "worker-1": 290.0}),
    ]
    return SoakTally(
        sent={"a": 0.1, "b": 0.2, "c": 21.0},
        latencies={"steady": [0.5, 0.1, 0.3], "burst": [0.9]},
        answered=answered,
        errors=errors or {},
        samples=samples,
        phases={"steady": (0.0, 20.0), "burst": (20.0, 25.0)},
    )


def test_a_clean_run_passes_and_keeps_the_result_shape() -> None:
    out = soak_outcome(CONFIG, worker_names=["worker-0"], tally=_tally(), drained_after_s=3.2, duplicates=1)
    assert list(out) == KEYS
    assert out["verdict"] == {
        "all_answered": True, "zero_errors": True, "lag_back_to_zero": True, "rss_flat": True,
    }  # fmt: skip
    assert out["passed"] is True
    assert (out["sent"], out["answered"], out["missing"], out["client_duplicates_dropped"]) == (3, 3, 0, 1)
    assert out["max_lag"] == dict.fromkeys(GROUP_TOPICS, 7)
    assert out["rss"]["worker-0"] == {
        "second_half_growth_mb": 2.0,  # 203 -> 205, samples at 12 and 20 s
        "after_warmup_mb": 200.0,  # the 0 s sample is warm-up, not judged
        "end_of_steady_mb": 205.0,
        "max_mb": 300.0,
        "end_mb": 300.0,
        "steady_growth_mb": 5.0,
    }
    assert out["latency"]["steady"] == {"n": 3, "p50_s": 0.3, "p99_s": 0.5, "mean_s": 0.3}
    assert out["latency"]["burst"]["n"] == 1


def test_each_failed_criterion_fails_the_run() -> None:
    grown = soak_outcome(
        CONFIG, worker_names=["worker-0", "worker-1"], tally=_tally(), drained_after_s=3.2, duplicates=0
    )
    assert grown["rss"]["worker-1"]["steady_growth_mb"] == 60.0
    assert grown["verdict"]["rss_flat"] is False and grown["passed"] is False

    unanswered = soak_outcome(
        CONFIG, worker_names=["worker-0"], tally=_tally(answered=2), drained_after_s=3.2, duplicates=0
    )
    assert unanswered["missing"] == 1
    assert unanswered["verdict"]["all_answered"] is False and unanswered["passed"] is False

    errored = soak_outcome(
        CONFIG,
        worker_names=["worker-0"],
        tally=_tally(errors={"backend_unavailable": 1}),
        drained_after_s=3.2,
        duplicates=0,
    )
    assert errored["verdict"]["zero_errors"] is False and errored["passed"] is False

    stuck = soak_outcome(
        CONFIG, worker_names=["worker-0"], tally=_tally(), drained_after_s=None, duplicates=0
    )
    assert stuck["verdict"]["lag_back_to_zero"] is False and stuck["passed"] is False


def test_a_worker_never_sampled_is_not_judged_flat() -> None:
    out = soak_outcome(CONFIG, worker_names=["worker-9"], tally=_tally(), drained_after_s=1.0, duplicates=0)
    assert set(out["rss"]["worker-9"].values()) == {None}
    assert out["verdict"]["rss_flat"] is False
