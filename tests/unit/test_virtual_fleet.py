"""The virtual fleet (bench/fleet/virtual.py) against the one-replica simulator it generalises."""

from __future__ import annotations

import numpy as np
import pytest

from bench.fleet.virtual import Arrival, Dispatch, FleetView, Replica, least_loaded, run_fleet
from devstack.batching import QWEN25_H200_MEASURED, BatchLimits, Job, simulate


def _jobs(n: int, rate: float, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1.0 / rate, size=n))
    prompts = rng.integers(100, 1500, size=n)
    news = rng.integers(8, 300, size=n)
    return [Job(f"r{i}", float(at[i]), int(prompts[i]), int(news[i])) for i in range(n)]


@pytest.mark.parametrize(
    ("rate", "limits"), [(20.0, BatchLimits()), (12.0, BatchLimits(max_batch_prefill_tokens=2048))]
)
def test_one_replica_reproduces_the_single_replica_simulator(rate: float, limits: BatchLimits) -> None:
    model = QWEN25_H200_MEASURED["qwen2.5-0.5b"]
    jobs = _jobs(400, rate, seed=3)
    expected = {o.request_id: o for o in simulate(jobs, model, limits)}
    assert not any(o.refused for o in expected.values())  # refusal timing differs by design
    tokens = {j.request_id: j.prompt_tokens for j in jobs}
    served = run_fleet(
        [Arrival(j.request_id, j.arrival_s, j.max_new_tokens) for j in jobs],
        lambda a, _view: Dispatch("gpu", tokens[a.request_id], "t"),
        [Replica("gpu", "small", model, limits)],
    )
    assert len(served) == len(jobs)
    for s in served:
        o = expected[s.request_id]
        assert s.first_token_s == pytest.approx(o.first_token_s, abs=1e-9)
        assert s.done_s == pytest.approx(o.done_s, abs=1e-9)


def test_the_router_sees_scraped_depths_and_its_own_pending_requests() -> None:
    model = QWEN25_H200_MEASURED["qwen2.5-1.5b"]
    seen: list[tuple[float, float, float]] = []

    def router(a: Arrival, view: FleetView) -> Dispatch:
        sample = view.samples.get("a")
        seen.append((view.now, sample.total if sample else -1.0, view.pending().get("a", 0.0)))
        return Dispatch("a", 200, "t")

    arrivals = [Arrival(f"r{i}", 0.01 * i, 400) for i in range(60)]  # 0.6 s of arrivals, none done
    run_fleet(arrivals, router, [Replica("a", "large", model)], probe_interval_s=0.25)
    # At 0.30 s the last scrape (0.25 s) counted the 25 requests sent by then (r0-r24); r25-r29 are pending.
    now, total, pending = seen[30]
    assert now == pytest.approx(0.30)
    assert total == 26  # r25 arrived at 0.25 s, before the scrape at the same instant
    assert pending == 4


def test_least_loaded_spreads_and_a_cache_hit_needs_no_replica() -> None:
    model = QWEN25_H200_MEASURED["qwen2.5-0.5b"]
    reps = [Replica("x", "small", model), Replica("y", "small", model)]

    def router(a: Arrival, view: FleetView) -> Dispatch:
        if a.request_id.endswith("7"):
            return Dispatch(None, 0, "cache")
        return Dispatch(least_loaded(view, ["x", "y"]), 300, "t")

    served = run_fleet([Arrival(f"r{i}", 0.001 * i, 200) for i in range(40)], router, reps)
    used = [s.replica for s in served if s.replica]
    assert abs(used.count("x") - used.count("y")) <= 1
    hits = [s for s in served if s.tag == "cache"]
    assert len(hits) == 4 and all(s.done_s == s.at_s for s in hits)


def test_a_finished_request_leaves_the_routers_in_flight_count() -> None:
    model = QWEN25_H200_MEASURED["qwen2.5-0.5b"]
    counts: list[int] = []

    def router(a: Arrival, view: FleetView) -> Dispatch:
        counts.append(view.in_flight("x"))
        return Dispatch("x", 300, "t")

    # r0 and r1 together; r2 ten seconds later, long after both finished (200 tokens take ~0.5 s)
    arrivals = [Arrival("r0", 0.0, 200), Arrival("r1", 0.0, 200), Arrival("r2", 10.0, 200)]
    served = run_fleet(arrivals, router, [Replica("x", "small", model)])
    assert counts == [0, 1, 0]
    assert all(s.done_s is not None and s.done_s < 11.0 for s in served)
