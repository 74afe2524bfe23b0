"""devstack/batching.py: TGI-like admission, step-time interpolation and a simulated trace."""

from __future__ import annotations

import math

import pytest

from devstack.batching import (
    QWEN25_H200_NOTES,
    BatchLimits,
    BatchScheduler,
    Job,
    ServiceModel,
    StepRecord,
    StepTable,
    kv_token_budget,
    simulate,
    take_batch,
)


def _jobs(*specs: tuple[int, int]) -> list[Job]:
    return [Job(f"r{i}", 0.0, p, n) for i, (p, n) in enumerate(specs)]


# ------------------------------------------------------------------------------------------ admission
@pytest.mark.parametrize(
    ("specs", "min_size", "max_size", "prefill_budget", "token_budget", "expected"),
    [
        # everything fits
        ([(100, 50), (100, 50), (100, 50)], None, None, 4096, 10_000, 3),
        # prefill budget: 100 + 100 fit in 250, the third would make 300
        ([(100, 50), (100, 50), (100, 50)], None, None, 250, 10_000, 2),
        # prefill budget exactly met is still in
        ([(100, 50), (150, 50)], None, None, 250, 10_000, 2),
        # total budget counts prompt + new tokens of the whole batch: 150 + 150 > 299
        ([(100, 50), (100, 50)], None, None, 4096, 299, 1),
        # FIFO: a head job over budget blocks the smaller ones behind it
        ([(5000, 1), (10, 1)], None, None, 4096, 10_000, 0),
        # max_size caps the batch
        ([(10, 1)] * 5, None, 2, 4096, 10_000, 2),
        # min_size: fewer waiting than needed -> nothing
        ([(10, 1)] * 2, 3, None, 4096, 10_000, 0),
        # min_size: enough waiting but the budget lets fewer in -> nothing
        ([(100, 1)] * 4, 3, None, 250, 10_000, 0),
        # min_size 0 admits whatever fits
        ([(10, 1)], 0, None, 4096, 10_000, 1),
        # no token budget left (running batch holds it all)
        ([(10, 1)], None, None, 4096, 0, 0),
    ],
)
def test_take_batch(
    specs: list[tuple[int, int]],
    min_size: int | None,
    max_size: int | None,
    prefill_budget: int,
    token_budget: int,
    expected: int,
) -> None:
    got = take_batch(
        _jobs(*specs),
        min_size=min_size,
        max_size=max_size,
        prefill_budget=prefill_budget,
        token_budget=token_budget,
    )
    assert got == expected


def test_offer_refuses_beyond_max_concurrent_requests() -> None:
    sched = BatchScheduler(BatchLimits(max_concurrent_requests=3))
    accepted = [sched.offer(j) for j in _jobs(*[(10, 5)] * 5)]
    assert accepted == [True, True, True, False, False]
    assert [j.request_id for j in sched.plan()] == ["r0", "r1", "r2"]
    assert not sched.offer(Job("late", 0.0, 10, 5))  # running ones count too


def test_running_batch_reserves_its_token_budget() -> None:
    sched = BatchScheduler(BatchLimits(max_batch_total_tokens=500))
    for job in _jobs((100, 200), (100, 200)):  # 300 each: the second does not fit beside the first
        sched.offer(job)
    assert [j.request_id for j in sched.plan()] == ["r0"]
    sched.prefilled([sched.running["r0"].job])
    assert sched.plan() == []  # 300 reserved, 200 left < 300
    for _ in range(199):
        finished = sched.decoded()
    assert [j.request_id for j in finished] == ["r0"]
    assert [j.request_id for j in sched.plan()] == ["r1"]


@pytest.mark.parametrize(
    ("running", "waiting", "steps_before", "joins"),
    [
        (10, 2, 0, False),  # floor(10 x 0.3) = 3 > 2 waiting: the running batch is not paused
        (10, 3, 0, True),  # 3 waiting: worth a prefill now
        (10, 2, 19, True),  # 20 decode steps since the last prefill: join anyway
        (10, 2, 18, False),
        (3, 1, 0, True),  # floor(3 x 0.3) = 0: any waiting request joins
    ],
)
def test_waiting_served_ratio_and_max_waiting_tokens(
    running: int, waiting: int, steps_before: int, joins: bool
) -> None:
    sched = BatchScheduler(BatchLimits())
    first = [Job(f"run{i}", 0.0, 10, 1000) for i in range(running)]
    for job in first:
        sched.offer(job)
    sched.prefilled(sched.plan())  # waiting_tokens = 1
    for _ in range(steps_before):
        sched.decoded()
    for i in range(waiting):
        sched.offer(Job(f"wait{i}", 0.0, 10, 1000))
    assert (len(sched.plan()) == waiting) is joins


def test_kv_token_budget_arithmetic() -> None:
    gib = 2**30
    assert kv_token_budget(gpu_bytes=10 * gib, weight_bytes=2 * gib, kv_bytes_per_token=2**20) == 4 * 1024
    with pytest.raises(ValueError, match="no room"):
        kv_token_budget(gpu_bytes=4 * gib, weight_bytes=1 * gib, kv_bytes_per_token=100.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_concurrent_requests": 0}, {"waiting_served_ratio": -0.1}, {"max_batch_size": 0}],
)
def test_limits_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        BatchLimits(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- step time
NOTES_05B = StepTable((1, 16, 64), (1.91, 2.20, 3.32))


@pytest.mark.parametrize(
    ("batch", "expected_ms"),
    [
        (1, 1.91),  # measured points are returned as measured
        (16, 2.20),
        (64, 3.32),
        (8, 1.91 + 7 / 15 * (2.20 - 1.91)),  # between points: linear
        (40, 2.20 + 24 / 48 * (3.32 - 2.20)),
        (128, 3.32 + 64 / 48 * (3.32 - 2.20)),  # past the last point: the last segment's slope
    ],
)
def test_step_table_interpolates(batch: int, expected_ms: float) -> None:
    assert NOTES_05B.decode_ms(batch) == pytest.approx(expected_ms)


def test_step_table_single_point_is_constant_and_validates() -> None:
    assert StepTable((4,), (7.0,)).decode_ms(1) == 7.0 == StepTable((4,), (7.0,)).decode_ms(100)
    for bad in (((16, 1), (1.0, 2.0)), ((1, 2), (1.0,)), ((1,), (0.0,)), ((0,), (1.0,))):
        with pytest.raises(ValueError, match=r"must|need"):
            StepTable(*bad)
    with pytest.raises(ValueError, match="at least one"):
        NOTES_05B.decode_ms(0)


def test_notes_tables_keep_the_measured_ceiling() -> None:
    small, large = QWEN25_H200_NOTES["qwen2.5-0.5b"], QWEN25_H200_NOTES["qwen2.5-1.5b"]
    assert large.decode_ms(64) / small.decode_ms(64) == pytest.approx(5.20 / 3.32)  # ~1.57x
    scaled = small.scaled(4.0)
    assert scaled.decode_ms(16) == pytest.approx(4 * 2.20) and scaled.prefill_ms(100) == 0.0


# ---------------------------------------------------------------------------------------- simulation
FLAT = ServiceModel("flat", StepTable((1,), (10.0,)), prefill_ms_per_token=1.0)


def test_simulated_trace_interleaves_prefill_with_decode() -> None:
    """A (prompt 10, 3 tokens) at 0; B (prompt 5, 2 tokens) at 15 ms. Decode 10 ms a step, prefill
    1 ms a token. t=0 prefill A (10 ms: A's first token at 10); decode to 20; B is seen, and with one
    running, floor(1 x 0.3) = 0 lets it in: prefill B (5 ms, first token at 25) pausing A; one decode
    of both to 35: A's third and B's second token, both done."""
    steps: list[StepRecord] = []
    jobs = [Job("A", 0.0, 10, 3), Job("B", 0.015, 5, 2)]
    a, b = simulate(jobs, FLAT, steps=steps)
    assert (a.ttft_s, a.e2e_s) == pytest.approx((0.010, 0.035))
    assert (b.ttft_s, b.e2e_s) == pytest.approx((0.010, 0.020))
    assert [(s.kind, s.size) for s in steps] == [
        ("prefill", 1),
        ("decode", 1),
        ("prefill", 1),
        ("decode", 2),
    ]


def test_simulated_trace_batches_simultaneous_arrivals_and_idles_between() -> None:
    jobs = [Job("a", 0.0, 10, 2), Job("b", 0.0, 20, 2), Job("c", 5.0, 10, 1)]
    a, b, c = simulate(jobs, FLAT)
    assert a.first_token_s == b.first_token_s == pytest.approx(0.030)  # one packed prefill, 30 tokens
    assert a.done_s == b.done_s == pytest.approx(0.040)
    assert (c.first_token_s, c.done_s) == pytest.approx((5.010, 5.010))  # one token: done at prefill


def test_simulation_refuses_over_the_concurrency_limit_and_serves_the_rest() -> None:
    jobs = [Job(f"r{i}", 0.0, 10, 4) for i in range(5)]
    out = simulate(jobs, FLAT, BatchLimits(max_concurrent_requests=2))
    assert [o.refused for o in out] == [False, False, True, True, True]
    assert out[0].ttft_s is not None and out[2].ttft_s is None and out[2].e2e_s is None


def test_simulation_queues_behind_the_token_budget() -> None:
    """Budget 30: one job (10 + 10) runs at a time, so the second starts when the first is done."""
    jobs = [Job("a", 0.0, 10, 10), Job("b", 0.0, 10, 10)]
    a, b = simulate(jobs, FLAT, BatchLimits(max_batch_total_tokens=30))
    assert a.done_s == pytest.approx(0.010 + 9 * 0.010)
    assert b.first_token_s == pytest.approx(a.done_s + 0.010)  # type: ignore[operator]


def test_simulated_latency_grows_with_load() -> None:
    """Same 200 jobs, arrivals compressed 4x: the median end-to-end latency must rise (batches grow)."""
    model = QWEN25_H200_NOTES["qwen2.5-1.5b"]

    def median_e2e(spacing_s: float) -> float:
        jobs = [Job(f"r{i}", i * spacing_s, 200, 150) for i in range(200)]
        values = sorted(o.e2e_s for o in simulate(jobs, model) if o.e2e_s is not None)
        return values[len(values) // 2]

    light, heavy = median_e2e(0.04), median_e2e(0.01)
    assert light == pytest.approx(149 * model.decode_ms(1) / 1000, rel=0.5)
    assert heavy > light and math.isfinite(heavy)


def test_a_job_that_can_never_fit_is_an_error() -> None:
    with pytest.raises(ValueError, match="never fit"):
        simulate([Job("huge", 0.0, 5000, 10)], FLAT)


@pytest.mark.parametrize(
    ("batch", "longest", "expected_ms"),
    [
        (16, None, 2.20),  # no context given: the table
        (16, 512, 2.20),  # at the reference context: the table
        (16, 1024, 2.20 + (0.001 + 0.0001 * 16) * 512),  # longer: intercept + per-sequence slope
        (1, 256, 1.91 - (0.001 + 0.0001) * 256),  # shorter: cheaper
    ],
)
def test_context_term(batch: int, longest: int | None, expected_ms: float) -> None:
    model = ServiceModel("m", NOTES_05B, 0.0, context_ref=512, context_ms=(0.001, 0.0001))
    assert model.decode_ms(batch, longest) == pytest.approx(expected_ms)
    assert model.scaled(2.0).decode_ms(batch, longest) == pytest.approx(2 * expected_ms)


def test_simulation_charges_the_longest_running_context() -> None:
    """Prompt 100, 3 tokens, 1 ms per context token per step: the decode steps see 101 and 102 tokens."""
    model = ServiceModel("m", StepTable((1,), (10.0,)), 0.0, context_ref=100, context_ms=(0.001, 0.0))
    (out,) = simulate([Job("a", 0.0, 100, 3)], model)
    assert out.e2e_s == pytest.approx((10.0 + 0.001) / 1000 + (10.0 + 0.002) / 1000)


def test_drop_forgets_waiting_and_running_requests() -> None:
    sched = BatchScheduler(BatchLimits(max_concurrent_requests=2))
    a, b = _jobs((10, 5), (10, 5))
    sched.offer(a)
    sched.plan()
    sched.offer(b)
    assert sched.reserved_tokens == 15
    assert sched.drop("r1") and sched.drop("r0") and not sched.drop("r0")
    assert sched.in_system == 0 and sched.reserved_tokens == 0
    assert sched.offer(Job("c", 0.0, 1, 1))  # the slots are free again


def test_measured_presets_keep_the_pair_ceiling_under_two() -> None:
    from devstack.batching import QWEN25_H200_MEASURED

    small, large = QWEN25_H200_MEASURED["qwen2.5-0.5b"], QWEN25_H200_MEASURED["qwen2.5-1.5b"]
    ratio = large.decode_ms(128, 600) / small.decode_ms(128, 600)
    assert 1.2 < ratio < 2.0  # the measured pair: offloading everything buys well under 2x
