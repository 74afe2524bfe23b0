"""bench/fleet/vsweep.py: each system's router on the virtual fleet (pure: no models, no I/O)."""

from __future__ import annotations

from typing import Any

from bench.fleet.virtual import Arrival, Replica, run_fleet
from bench.fleet.vsweep import LoadTerm, _Request, make_router
from devstack.batching import QWEN25_FLASH_PREFILL, BatchLimits
from infra.settings import BackendSettings, RoutingSettings


def _decisions(**over: Any) -> dict[str, Any]:
    backends = [
        BackendSettings(name="small-0", url="http://s", tier="small", cost=1.0, quality_prior=0.374),
        BackendSettings(name="large-0", url="http://l", tier="large", cost=1.48, quality_prior=0.5),
    ]
    return {
        "routing": RoutingSettings(cost_weight=0.05).model_dump(mode="json"),
        "backends": [b.model_dump(mode="json") for b in backends],
        "stale_after_s": 2.0,
        "probe_interval_s": 0.25,
        "retries": 2,
        "circuit_failures": 3,
        "circuit_reset_s": 5.0,
        "semantic_threshold": 0.8,
        **over,
    }


def _row(nearest: float, *, small_mean: float = 0.86) -> dict[str, Any]:
    return {
        "group": "g",
        "tokens": 100,
        "nearest": nearest,
        "nearest_group": "g",
        "n_examples": 2,
        "example_tokens": 400,
        "example_groups": ["g"],
        "estimates": {"small": [small_mean, 0.1], "large": [0.5, 0.1]},
        "shown": {"small": True, "large": False},
    }


def _fleet(limit: int) -> list[Replica]:
    limits = BatchLimits(max_concurrent_requests=limit)
    return [
        Replica("small-0", "small", QWEN25_FLASH_PREFILL["qwen2.5-0.5b"], limits),
        Replica("large-0", "large", QWEN25_FLASH_PREFILL["qwen2.5-1.5b"], limits),
    ]


def test_echolm_reroutes_a_refused_request_where_a_baseline_loses_it() -> None:
    requests = {f"r{i}": _Request("q", "g", _row(0.9)) for i in range(6)}
    arrivals = [Arrival(k, 0.0, 50) for k in requests]
    out = {}
    for retries in (2, 0):
        reps = _fleet(limit=2)
        spec = make_router("echolm", requests, reps, _decisions(retries=retries), LoadTerm())
        served = run_fleet(arrivals, spec.route, reps, retries=spec.retries, feedback=spec.feedback)
        out[retries] = served
    kept = out[2]
    assert [s.replica for s in kept[:2]] == ["small-0", "small-0"]  # the examples make small the best
    assert all(s.replica == "large-0" for s in kept[2:4])  # small full: re-routed, served alone on large
    assert {s.tag for s in kept[2:4]} == {"large"}
    assert sum(s.refused for s in kept) == 2  # both replicas full
    lost = out[0]  # no retries: r2-r4 are lost on small; their three 429s open its circuit, so r5 goes large
    assert [s.refused for s in lost] == [False, False, True, True, True, False]
    assert lost[5].replica == "large-0"


def test_an_open_circuit_sends_the_next_requests_elsewhere() -> None:
    requests = {f"r{i}": _Request("q", "g", _row(0.9)) for i in range(8)}
    reps = _fleet(limit=1)
    spec = make_router("echolm", requests, reps, _decisions(retries=0), LoadTerm(load_lambda=0.0))
    # r0 fills small; r1-r3 are refused there (three failures open its circuit); r4 must skip small
    arrivals = [Arrival(f"r{i}", 0.001 * i, 400) for i in range(5)]
    served = run_fleet(arrivals, spec.route, reps, retries=spec.retries, feedback=spec.feedback)
    assert served[0].replica == "small-0" and not served[0].refused
    assert all(s.refused and s.replica == "small-0" for s in served[1:3])
    assert served[4].replica == "large-0"


def test_cache_and_quality_router_decide_by_the_nearest_bank_row() -> None:
    requests = {"near": _Request("a", "g", _row(0.85)), "far": _Request("b", "g", _row(0.5))}
    arrivals = [Arrival("near", 0.0, 20), Arrival("far", 0.0, 20)]
    reps = _fleet(limit=128)
    cache = make_router("semantic-cache", requests, reps, _decisions(), LoadTerm())
    served = {s.request_id: s for s in run_fleet(arrivals, cache.route, reps)}
    assert served["near"].replica is None and served["near"].tag == "cache_match"
    assert served["far"].replica == "large-0" and served["far"].tag == "large"
    router = make_router("quality-router", requests, _fleet(limit=128), _decisions(), LoadTerm())
    served = {s.request_id: s for s in run_fleet(arrivals, router.route, _fleet(limit=128))}
    assert served["near"].tag == "small_alone" and served["far"].tag == "large"
