"""devstack/tgi_batched.py: the TGI-batching emulated engine on a virtual clock."""

from __future__ import annotations

import asyncio

from devstack.batching import BatchLimits, ServiceModel, StepTable
from devstack.tgi_batched import BatchedEmulatedEngine
from devstack.tgi_dev.engine import SamplingParams


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def test_concurrent_streams_share_decode_steps_and_report_gauges() -> None:
    clock = VirtualClock()
    engine = BatchedEmulatedEngine(
        service=ServiceModel("m", StepTable((1,), (10.0,)), prefill_ms_per_token=0.0),
        limits=BatchLimits(max_concurrent_requests=4),
        clock=clock,
        sleep=clock.sleep,
    )

    async def run(n: int) -> tuple[int, float]:
        tokens = [t async for t in engine.stream("x" * 40, SamplingParams(max_new_tokens=n, seed=0))]
        assert tokens[-1].finish_reason == "length"
        return len(tokens), clock.now

    results = await asyncio.gather(run(5), run(5), run(3))
    assert [n for n, _ in results] == [5, 5, 3]
    # One prefill (0 ms) gives every stream its first token; then 4 shared decode steps, not 4 + 4 + 2.
    assert engine.steps == 4
    assert max(t for _, t in results) == 0.040
    gauges = engine.gauges
    assert (gauges.waiting, gauges.running, gauges.running_max_tokens) == (0, 0, 0)
    await engine.aclose()


async def test_a_closed_stream_leaves_the_batch() -> None:
    clock = VirtualClock()
    engine = BatchedEmulatedEngine(
        service=ServiceModel("m", StepTable((1,), (10.0,)), 0.0), clock=clock, sleep=clock.sleep
    )
    stream = engine.stream("hello", SamplingParams(max_new_tokens=100, seed=0))
    await stream.__anext__()
    assert engine.gauges.running == 1
    await stream.aclose()
    assert engine.gauges.running == 0 and engine.gauges.waiting == 0
    await engine.aclose()
