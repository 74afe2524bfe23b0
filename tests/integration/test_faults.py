"""Faults injected for real, asserted from the client's side (docs/reliability.md, failure matrix).

* a worker SIGKILLed mid-stream: every request answered, exactly once as the client sees it;
* a worker SIGTERMed with requests in flight: those are answered within ``shutdown_grace_s``;
* backends killed and restarted, overloaded (429), frozen (SIGSTOP: /metrics and generation hang),
  hanging (emulated, huge service time), refusing connections: retry elsewhere within the deadline,
  circuits open and close again, and an error reply (never silence) when nothing can serve;
* Milvus stopped mid-run: served without examples, counted, and back to examples when it returns;
* the broker restarted (Tansu is memory-only, so it comes back empty): workers and clients
  reconnect and new requests are served.

Backends here are dev TGI servers the test owns (``fleet.OwnedBackend``): the emulated engine with a
few ms of service time where volume matters, the real SmolLM2 engine where a real server must fail.
Never asserts on reply wording.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from devstack.localstack import LocalStack, MilvusServer, TansuBroker, create_topics, free_port
from devstack.workers import WorkerProcess
from echolm.client import EchoClient, Reply
from infra.kafka import kafka_client_kwargs
from infra.milvus import MilvusExampleStore
from infra.settings import Settings
from streams.topology import topic_specs

from .conftest import Pipeline
from .fleet import (
    FAST,
    OwnedBackend,
    backends_section,
    collect_replies,
    crash_report,
    make_pipeline,
    owned_backends,
    per_id,
    read_topic,
    shutdown_counts,
    start_workers,
    worker_pid,
)

pytestmark = pytest.mark.integration


def _tiers(**service: float) -> list[OwnedBackend]:
    small = OwnedBackend("emu-small", "small", cost=1.0, quality_prior=0.45)
    large = OwnedBackend("emu-large", "large", cost=10.0, quality_prior=0.8)
    for b in (small, large):
        b.service.update(service)
    return [small, large]


# ------------------------------------------------------------------ worker crash and shutdown
@dataclass
class WorkerPool:
    """A pipeline on two emulated backends; the tests kill and add workers (at most 3 start in all)."""

    pipeline: Pipeline
    backends: list[OwnedBackend]

    @property
    def settings(self) -> Settings:
        return self.pipeline.settings

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.pipeline.workers if w.running]

    async def ensure(self, n: int) -> list[WorkerProcess]:
        missing = n - len(self.live())
        if missing > 0:
            await start_workers(self.pipeline, missing)
        return self.live()[:n]


@pytest.fixture(scope="module")
async def worker_pool(
    local_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[WorkerPool]:
    log_dir = tmp_path_factory.mktemp("worker-pool")
    backends = _tiers()
    for backend in backends:
        backend.log_requests = True  # the kill test counts generations per request at the backends
    async with owned_backends(backends, log_dir):
        pipeline = await make_pipeline(
            local_stack,
            log_dir,
            tgi=backends_section(backends),
            # the kill test counts records on the prepared topic: the hop between two processes' stages
            worker={"shutdown_grace_s": 6.0, "prepared_hop": "kafka"},
            replay={"enabled": False},  # replay generates logged requests again: not what is counted here
        )
        try:
            yield WorkerPool(pipeline, backends)
        finally:
            await pipeline.stop()


async def _until(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        await asyncio.sleep(0.2)


async def test_sigkill_mid_stream_every_request_answered_exactly_once(worker_pool: WorkerPool) -> None:
    """Re-deliveries made certain, and each answered request still generated exactly once.

    The victim serves alone and never commits an offset (``kafka.commit_interval_s`` = 1 h for it), so
    when it is SIGKILLed after answering every request of phase A, all of them are re-delivered (from
    the requests and the prepared topics) to the two fresh workers that take over, while phase B
    streams new requests. The fresh workers load the answered topic at start and re-send the stored
    replies: duplicates reach the wire (counted with a raw consumer), ``EchoClient`` delivers each id
    once, and the backends (their request logs) saw one generation per request id.
    """
    n_before, n_after, rate = 60, 120, 20.0
    pipeline, settings = worker_pool.pipeline, worker_pool.settings
    assert not worker_pool.live(), "this test starts the pool's first workers (it must run first)"
    (victim,) = await start_workers(pipeline, 1, kafka={"commit_interval_s": 3600.0})
    got: dict[str, Reply] = {}
    deliveries: Counter[str] = Counter()
    prompts: dict[str, str] = {}

    async def send(prompt: str) -> str:
        rid = await client.send(prompt, tenant="acme", max_new_tokens=4)
        prompts[rid] = prompt
        return rid

    async with EchoClient(settings) as client:

        async def read() -> None:
            async for reply in client.replies():
                deliveries[reply.request_id] += 1
                got[reply.request_id] = reply

        reader = asyncio.create_task(read())
        try:
            before = [await send(f"Stream item {i}: say ok.") for i in range(n_before)]
            await _until(lambda: set(before) <= got.keys(), 120, "phase A's replies")
            victim.kill()  # answered everything, committed nothing
            taking_over = asyncio.create_task(start_workers(pipeline, 2))
            began = time.monotonic()
            after = []
            for i in range(n_after):
                after.append(await send(f"Takeover item {i}: say ok."))
                await asyncio.sleep(max(0.0, began + (i + 1) / rate - time.monotonic()))
            fresh = await taking_over
            wanted = set(before) | set(after)
            await _until(lambda: wanted <= got.keys(), 120, "phase B's replies")
            # the takeover re-processes phase A: wait until every phase-A id is on the wire again
            wire: Counter[str] = Counter()
            deadline = time.monotonic() + 120
            while not all(wire[rid] >= 2 for rid in before) and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                wire = per_id(await read_topic(settings, settings.topic("replies")))
            await asyncio.sleep(1.0)  # any later duplicate reaches the client too
        finally:
            reader.cancel()
        client_duplicates = client.duplicates

    wire = per_id(
        r for r in await read_topic(settings, settings.topic("replies")) if r["request_id"] in wanted
    )
    served = per_id(
        r["request"]
        for r in await read_topic(settings, settings.topic("log"))
        if r["request"]["request_id"] in wanted
    )
    prepared = per_id(
        r["request"]
        for r in await read_topic(settings, settings.topic("prepared"))
        if r["request"]["request_id"] in wanted
    )
    generated: Counter[str] = Counter()
    for backend in worker_pool.backends:
        generated.update(backend.generations())
    generations = {rid: generated[prompts[rid]] for rid in wanted}

    # The client's view: every request answered, successfully, delivered exactly once.
    assert set(got) == wanted, f"{len(wanted - set(got))} requests never answered"
    assert all(r.ok for r in got.values()), [r for r in got.values() if not r.ok][:3]
    assert {worker_pid(got[rid]) for rid in before} == {victim.pid}
    assert all(deliveries[rid] == 1 for rid in wanted), {r: n for r, n in deliveries.items() if n != 1}
    # Re-deliveries certainly happened: every phase-A reply is on the wire at least twice.
    redelivered = [rid for rid in before if wire[rid] >= 2]
    report = crash_report([victim, *fresh])
    assert len(redelivered) == n_before, f"only {len(redelivered)} of {n_before} re-sent: {report}"
    # ... and none was generated again: one generation per request id at the backends.
    again = {rid: n for rid, n in generations.items() if n != 1}
    counts = sorted(set(again.values()))
    assert not again, (
        f"{len(again)} ids generated other than once ({counts} times); e.g. {list(again.items())[:3]}"
    )
    wire_duplicates = sum(n - 1 for n in wire.values())
    print(
        f"\nsigkill: {n_before} answered by pid {victim.pid} then SIGKILLed (no offsets committed), "
        f"{n_after} more at {rate:g}/s during the takeover by pids {[w.pid for w in fresh]}; replies on the "
        f"wire {sum(wire.values())} ({wire_duplicates} duplicates, {len(redelivered)} ids re-sent), client "
        f"deliveries {sum(deliveries.values())} (dropped {client_duplicates}); generations per id "
        f"{dict(Counter(generations.values()))}; log records per id {dict(Counter(served.values()))}; "
        f"prepared records per id {dict(Counter(prepared.values()))}"
    )


async def test_sigterm_drains_in_flight_within_grace(worker_pool: WorkerPool) -> None:
    """SIGTERM: the leaving worker takes no new record (not even one already in its stream buffers),
    answers what it holds within the grace, exits 0; the rest moves to the other worker, and the
    client sees every request answered exactly once (each reply ``replies()`` yields is counted)."""
    settings = worker_pool.settings
    leaving, staying = await worker_pool.ensure(2)
    grace = settings.worker.shutdown_grace_s
    # About 1.3 s per request (160 ms per token, 8 tokens), 8 at a time per worker.
    for backend in worker_pool.backends:
        backend.service["decode_ms_per_token"] = 160.0
        await backend.restart()
    delivered: Counter[str] = Counter()
    arrivals: dict[str, float] = {}
    got: dict[str, Reply] = {}
    try:
        async with EchoClient(settings) as client:
            ids = [
                await client.send(f"Drain item {i}: say ok.", tenant="acme", max_new_tokens=8)
                for i in range(60)
            ]

            async def read(until: Callable[[], bool], timeout_s: float) -> None:
                deadline = time.monotonic() + timeout_s
                while not until() and time.monotonic() < deadline:
                    async for reply in client.replies(timeout=0.2):
                        delivered[reply.request_id] += 1
                        got[reply.request_id] = reply
                        arrivals[reply.request_id] = time.monotonic()
                        if until():
                            break

            # Wait until the leaving worker has answered something, so it surely holds work in flight.
            await read(lambda: any(worker_pid(r) == leaving.pid for r in got.values()), 60)
            assert any(worker_pid(r) == leaving.pid for r in got.values()), "the leaving worker never served"
            signalled, signalled_wall = time.monotonic(), time.time()
            signalled_at = time.strftime("%H:%M:%S")
            stopping = asyncio.create_task(leaving.stop(timeout_s=grace + 20))
            exited = 0.0

            def on_exit(_: object) -> None:
                nonlocal exited
                exited = time.monotonic()

            stopping.add_done_callback(on_exit)
            await read(lambda: set(ids) <= got.keys(), 120)
            exit_code = await stopping
            await read(lambda: False, 2.0)  # a late duplicate would be delivered now, if at all
            client_duplicates = client.duplicates
    finally:
        for backend in worker_pool.backends:
            backend.service["decode_ms_per_token"] = FAST["decode_ms_per_token"]
            await backend.restart()

    # exactly once as the client sees it: every id delivered by replies(), none twice
    assert set(delivered) == set(ids), f"{len(set(ids) - set(delivered))} requests never answered"
    assert all(n == 1 for n in delivered.values()), [i for i, n in delivered.items() if n > 1]
    assert all(r.ok for r in got.values())
    counts = shutdown_counts(leaving.log_path.read_text(errors="replace"))
    assert counts is not None, leaving.log_tail()
    in_flight, drained, abandoned = counts
    assert in_flight > 0 and drained == in_flight and abandoned == 0, counts
    after = [rid for rid, at in arrivals.items() if at > signalled]
    # It took nothing new after the signal: the replies it produced after it (the broker's timestamps,
    # not the client's arrival times, which lag) are at most the requests it held at the signal.
    produced = await _reply_times(settings, {str(leaving.pid)})
    late = [rid for rid, at in produced.items() if rid in got and at >= signalled_wall]
    assert len(late) <= in_flight, (len(late), in_flight)
    assert any(worker_pid(got[rid]) == staying.pid for rid in after), "the rest moved to the other worker"
    assert exit_code == 0, leaving.log_tail()
    assert exited - signalled < grace + 5, (
        exited - signalled
    )  # the drain is bounded by the grace, then a prompt stop
    print(
        f"\nsigterm: {in_flight} in flight at the signal, all drained; {len(late)} answered by the leaving "
        f"worker after the signal, {sum(worker_pid(got[r]) == staying.pid for r in after)} by the other; "
        f"{client_duplicates} duplicate replies dropped by the client; exit {exit_code} after "
        f"{exited - signalled:.1f}s (grace {grace:g}s; SIGTERM at {signalled_at})"
    )


async def test_sigterm_records_cut_at_the_grace_end_are_served_by_the_other_worker(
    worker_pool: WorkerPool,
) -> None:
    """A grace too short for the requests in flight: those it cuts off are not committed (faust would
    ack them in its ``finally``; the ``AckGate`` does not), so the worker that takes their partitions
    over serves them, and the client still sees every request answered exactly once."""
    settings = worker_pool.settings
    (staying,) = await worker_pool.ensure(1)
    (leaving,) = await start_workers(worker_pool.pipeline, 1, shutdown_grace_s=0.3)
    for backend in worker_pool.backends:  # about 1.3 s per request: far longer than the grace
        backend.service["decode_ms_per_token"] = 160.0
        await backend.restart()
    delivered: Counter[str] = Counter()
    got: dict[str, Reply] = {}
    try:
        async with EchoClient(settings) as client:
            ids = [
                await client.send(f"Cut item {i}: say ok.", tenant="acme", max_new_tokens=8)
                for i in range(40)
            ]

            async def read(until: Callable[[], bool], timeout_s: float) -> None:
                deadline = time.monotonic() + timeout_s
                while not until() and time.monotonic() < deadline:
                    async for reply in client.replies(timeout=0.2):
                        delivered[reply.request_id] += 1
                        got[reply.request_id] = reply
                        if until():
                            break

            await read(lambda: any(worker_pid(r) == leaving.pid for r in got.values()), 60)
            assert any(worker_pid(r) == leaving.pid for r in got.values()), "the leaving worker never served"
            # its first wave of (up to concurrency) requests started together and ends together; the
            # signal comes well into the next wave, so the 0.3 s grace cuts it (at the first reply, the
            # rest of the first wave drained within the grace: 8 in flight, 8 drained, 1 run in 8)
            await asyncio.sleep(0.5)
            exit_code = await leaving.stop(timeout_s=30)
            await read(lambda: set(ids) <= got.keys(), 120)
            await read(lambda: False, 2.0)  # a late duplicate would be delivered now, if at all
    finally:
        for backend in worker_pool.backends:
            backend.service["decode_ms_per_token"] = FAST["decode_ms_per_token"]
            await backend.restart()

    counts = shutdown_counts(leaving.log_path.read_text(errors="replace"))
    assert counts is not None, leaving.log_tail()
    in_flight, drained, abandoned = counts
    assert abandoned > 0, counts  # the grace cut requests off
    assert set(delivered) == set(ids), (
        f"{len(set(ids) - set(delivered))} requests never answered (cut and committed?); "
        f"{crash_report(worker_pool.pipeline.workers)}"
    )
    assert all(n == 1 for n in delivered.values()), [i for i, n in delivered.items() if n > 1]
    assert all(r.ok for r in got.values()), [r for r in got.values() if not r.ok][:3]
    assert exit_code == 0, leaving.log_tail()
    print(
        f"\nsigterm cut: {in_flight} in flight at the signal, {drained} drained, {abandoned} cut by the "
        f"{leaving.settings.worker.shutdown_grace_s:g}s grace; all {len(ids)} answered once "
        f"({sum(worker_pid(r) == staying.pid for r in got.values())} by the other worker)"
    )


async def _reply_times(settings: Settings, pids: set[str]) -> dict[str, float]:
    """request id -> the wall time (s) its reply was produced, for replies from workers ``pids``."""
    topic = settings.topic("replies")
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), group_id=None, enable_auto_commit=False)
    await consumer.start()
    out: dict[str, float] = {}
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > await consumer.position(tp)}
        while remaining:
            for messages in (await consumer.getmany(*remaining, timeout_ms=500)).values():
                for m in messages:
                    value = orjson.loads(m.value) if m.value else {}
                    if str(value.get("worker", "")).rsplit(":", 1)[-1] in pids:
                        out[value["request_id"]] = m.timestamp / 1000.0
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return out


# ----------------------------------------------------------------------------- backend faults
@dataclass
class LlamaFleet:
    """One worker in front of two real dev TGI servers (SmolLM2) of the large tier, owned by the module."""

    pipeline: Pipeline
    a: OwnedBackend
    b: OwnedBackend
    worker: WorkerProcess

    @property
    def settings(self) -> Settings:
        return self.pipeline.settings


# Generous for SmolLM2 on two busy cores (one llama server decodes one sequence at a time), short
# enough that a hung attempt costs little. The worker keeps at most 4 requests in flight.
REQUEST_TIMEOUT_S = 8.0
CIRCUIT_RESET_S = 2.0


@pytest.fixture(scope="module")
async def llama_fleet(
    local_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LlamaFleet]:
    log_dir = tmp_path_factory.mktemp("llama-fleet")
    a = OwnedBackend("large-a", "large", engine="llama", cost=10.0, quality_prior=0.8)
    b = OwnedBackend("large-b", "large", engine="llama", cost=10.0, quality_prior=0.8)
    async with owned_backends([a, b], log_dir):
        tgi = backends_section(
            [a, b],
            request_timeout_s=REQUEST_TIMEOUT_S,
            circuit_failures=3,
            circuit_reset_s=CIRCUIT_RESET_S,
            retries=2,
        )
        pipeline = await make_pipeline(local_stack, log_dir, tgi=tgi, worker={"concurrency": 4})
        try:
            (worker,) = await start_workers(pipeline, 1)
            yield LlamaFleet(pipeline, a, b, worker)
        finally:
            await pipeline.stop()


@pytest.fixture
async def fleet(llama_fleet: LlamaFleet) -> AsyncIterator[LlamaFleet]:
    """The module's fleet, with both backends healthy before and after each test."""
    await _restore(llama_fleet)
    yield llama_fleet
    await _restore(llama_fleet)


async def _restore(fleet: LlamaFleet) -> None:
    changed = False
    for backend in (fleet.a, fleet.b):
        baseline = backend.engine == "llama" and backend.max_concurrent_requests == 128
        if not baseline or backend.server is None or not backend.server.running:
            backend.engine, backend.max_concurrent_requests = "llama", 128
            await backend.restart()
            changed = True
        else:
            backend.thaw()
    if changed:  # circuits opened by the last test half-open after the reset time
        await asyncio.sleep(CIRCUIT_RESET_S + 0.5)
    assert fleet.worker.running, fleet.worker.log_tail()


async def _ask_many(client: EchoClient, n: int, tag: str, **kw: Any) -> dict[str, Reply]:
    ids = {
        await client.send(f"{tag} {i}: name a colour.", tenant="acme", max_new_tokens=4, **kw)
        for i in range(n)
    }
    got = await collect_replies(client, ids, timeout_s=120)
    assert set(got) == ids, f"{len(ids - set(got))} of {n} requests got no reply (silence)"
    return got


async def _routes(settings: Settings, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    wanted = set(ids)
    return {
        r["request"]["request_id"]: r["route"]
        for r in await read_topic(settings, settings.topic("log"))
        if r["request"]["request_id"] in wanted and r.get("origin") == "serve"
    }


async def test_backend_killed_and_restarted_under_load(fleet: LlamaFleet) -> None:
    a, b = fleet.a, fleet.b
    async with EchoClient(fleet.settings) as client:
        ids = {
            await client.send(f"Load {i}: name a colour.", tenant="acme", max_new_tokens=4) for i in range(16)
        }
        got: dict[str, Reply] = {}
        deadline = time.monotonic() + 60
        while not any(r.backend == a.name for r in got.values()):  # a is surely busy now
            assert time.monotonic() < deadline, "large-a never answered"
            await collect_replies(client, ids, timeout_s=0.1, into=got)
        a.kill()
        await collect_replies(client, ids, timeout_s=120, into=got)
        assert set(got) == ids and all(r.ok for r in got.values()), [r for r in got.values() if not r.ok]

        down = await _ask_many(client, 10, "While down")
        assert all(r.ok and r.backend == b.name for r in down.values())

        await a.start()  # the same port: the worker's URL for it is valid again
        await asyncio.sleep(CIRCUIT_RESET_S + 0.5)
        back = await _ask_many(client, 12, "Back")
    assert all(r.ok for r in back.values())
    assert any(r.backend == a.name for r in back.values()), "large-a was never probed back into service"
    routes = await _routes(fleet.settings, ids)
    retried = [rid for rid, route in routes.items() if route["attempts"] > 1]
    assert retried, "requests in flight on the killed backend must have been retried on the other"
    assert all(got[rid].backend == b.name for rid in retried)
    print(
        f"\nkill/restart: {len(retried)} of 16 retried on {b.name}; "
        f"{sum(r.backend == a.name for r in back.values())} of 12 back on {a.name}"
    )


async def test_overloaded_backend_429_is_retried_elsewhere(fleet: LlamaFleet) -> None:
    a, b = fleet.a, fleet.b
    a.max_concurrent_requests = 1  # past one request in flight it answers 429 "Model is overloaded"
    await a.restart()
    async with EchoClient(fleet.settings) as client:
        got = await _ask_many(client, 16, "Overload")
    assert all(r.ok for r in got.values()), [r for r in got.values() if not r.ok]
    overloaded = await a.failures("overloaded")
    assert overloaded > 0, "the worker never pushed large-a past its limit: the test proves nothing"
    routes = await _routes(fleet.settings, got)
    assert any(route["attempts"] > 1 for route in routes.values())
    print(
        f"\n429: {overloaded:.0f} answered 429 by {a.name}, all 16 served "
        f"({sum(r.backend == b.name for r in got.values())} by {b.name})"
    )


async def test_frozen_backend_times_out_and_goes_stale(fleet: LlamaFleet) -> None:
    """SIGSTOP while it holds requests: generation and /metrics hang. Those requests time out and
    move; the probe marks the backend unhealthy, so new ones avoid it without waiting for a timeout."""
    a, b = fleet.a, fleet.b
    async with EchoClient(fleet.settings) as client:
        ids = {
            await client.send(f"Frozen {i}: name a colour.", tenant="acme", max_new_tokens=4)
            for i in range(12)
        }
        got: dict[str, Reply] = {}
        deadline = time.monotonic() + 60
        while not any(r.backend == a.name for r in got.values()):  # a is surely busy now
            assert time.monotonic() < deadline, "large-a never answered"
            await collect_replies(client, ids, timeout_s=0.1, into=got)
        a.freeze()
        frozen_at = time.monotonic()
        await collect_replies(client, ids, timeout_s=120, into=got)
        after = await _ask_many(client, 6, "While frozen", deadline_s=30)
        a.thaw()
    assert set(got) == ids and all(r.ok for r in got.values()), [r for r in got.values() if not r.ok]
    assert all(r.ok and r.backend == b.name for r in after.values())
    assert max(r.latency_s for r in after.values()) < REQUEST_TIMEOUT_S, (
        "new requests waited on the frozen one"
    )
    routes = await _routes(fleet.settings, set(got) | set(after))
    retried = [rid for rid in got if routes[rid]["attempts"] > 1]
    assert retried, "requests held by the frozen backend must have timed out and moved"
    avoided = [
        r
        for r in routes.values()
        if a.name in r["reason"] and ("unhealthy" in r["reason"] or "circuit" in r["reason"])
    ]
    assert avoided, "no routing decision saw large-a as unhealthy or open while it was frozen"
    print(
        f"\nfrozen: {len(retried)} timed out on {a.name} and moved; {len(avoided)} decisions avoided it; "
        f"new requests served in at most {max(r.latency_s for r in after.values()):.1f}s "
        f"({time.monotonic() - frozen_at:.1f}s frozen)"
    )


async def test_hanging_backend_times_out_and_retries(fleet: LlamaFleet) -> None:
    """An emulated backend that answers /metrics but never finishes a generation."""
    a, b = fleet.a, fleet.b
    a.engine = "emulated"
    a.service = {"prefill_ms_per_token": 0.1, "decode_ms_per_token": 600_000.0, "batch_slowdown": 0.0}
    await a.restart()
    async with EchoClient(fleet.settings) as client:
        got = await _ask_many(client, 10, "Hang", deadline_s=60)
    assert all(r.ok and r.backend == b.name for r in got.values()), [r for r in got.values() if not r.ok]
    routes = await _routes(fleet.settings, got)
    retried = [r for r in routes.values() if r["attempts"] > 1]
    assert retried, "no request was sent to the hanging backend"
    assert max(r.latency_s for r in got.values()) < 60


async def test_nothing_can_serve_error_reply_before_deadline(fleet: LlamaFleet) -> None:
    a, b = fleet.a, fleet.b
    deadline_s = 10.0
    async with EchoClient(fleet.settings) as client:
        a.kill()
        b.kill()
        refused = await _ask_many(client, 5, "Refused", deadline_s=deadline_s)
        await a.start()
        await b.start()
        await asyncio.sleep(CIRCUIT_RESET_S + 0.5)
        a.freeze()
        b.freeze()
        hung = await _ask_many(client, 3, "Hung", deadline_s=deadline_s)
    for reply in refused.values():
        assert not reply.ok and reply.error_code == "no_backend_available", reply
    for reply in hung.values():  # the deadline ran out on a frozen backend, or every circuit was open
        assert not reply.ok and reply.error_code in ("deadline_exceeded", "no_backend_available"), reply
    for reply in [*refused.values(), *hung.values()]:
        assert reply.latency_s < deadline_s, f"error reply after the deadline: {reply.latency_s:.2f}s"
    print(
        f"\nnothing can serve: refused -> error in {max(r.latency_s for r in refused.values()):.2f}s, "
        f"hung -> error in {max(r.latency_s for r in hung.values()):.2f}s (deadline {deadline_s}s)"
    )


# -------------------------------------------------------------------------- dependency faults
async def _prepared_bypass(settings: Settings, ids: Iterable[str]) -> dict[str, str]:
    """request id -> ``selection_bypassed`` of its latest prepared record ("" = selection ran)."""
    wanted = set(ids)
    out: dict[str, str] = {}
    for record in await read_topic(settings, settings.topic("prepared")):
        rid = record["request"]["request_id"]
        if rid in wanted:
            out[rid] = record["selection_bypassed"]
    return out


async def _count_examples(settings: Settings, tenant: str) -> int:
    async with MilvusExampleStore(settings.milvus) as store:
        return await store.count(tenant)


SEED = [
    "How do I reset my password?",
    "How do I cancel my subscription?",
    "What is the capital of France?",
    "How long does shipping to Canada take?",
    "How do I change my email address?",
    "Do you offer student discounts?",
]
PARAPHRASES = [
    "How can I reset my password?",
    "How can I cancel my subscription?",
    "What's the capital city of France?",
    "How long does delivery to Canada take?",
    "How can I change my e-mail address?",
    "Is there a discount for students?",
]


async def test_milvus_down_serves_without_examples_and_recovers(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    milvus = MilvusServer(data_dir=tmp_path / "milvus", port=free_port())
    backends = _tiers()
    await milvus.start()
    try:
        async with owned_backends(backends, tmp_path):
            pipeline = await make_pipeline(
                local_stack,
                tmp_path,
                milvus_uri=milvus.uri,
                tgi=backends_section(backends),
                worker={"prepared_hop": "kafka"},  # the bypass is read from the prepared records
            )
            settings = pipeline.settings
            try:
                await start_workers(pipeline, 1)
                async with EchoClient(settings) as client:
                    for prompt in SEED:  # one at a time: idle backends, the large tier answers, admitted
                        assert (await client.ask(prompt, tenant="acme", timeout=60, max_new_tokens=4)).ok
                    deadline = time.monotonic() + 30
                    while await _count_examples(settings, "acme") < len(SEED):
                        assert time.monotonic() < deadline, "seed answers were never admitted"
                        await asyncio.sleep(0.5)
                    warm = {await client.send(p, tenant="acme", max_new_tokens=4) for p in PARAPHRASES}
                    before = await collect_replies(client, warm, timeout_s=60)
                    assert set(before) == warm

                    await milvus.stop()
                    stopped = time.monotonic()
                    ids = {
                        await client.send(f"During the outage {i}", tenant="acme", max_new_tokens=4)
                        for i in range(12)
                    }
                    outage = await collect_replies(client, ids, timeout_s=120)
                    assert set(outage) == ids, f"silence during the outage: {crash_report(pipeline.workers)}"
                    outage_s = time.monotonic() - stopped

                    await milvus.start()
                    restarted = time.monotonic()
                    recovered_after = None
                    rounds = 0
                    while recovered_after is None and time.monotonic() < restarted + 120:
                        rounds += 1
                        probe = {await client.send(p, tenant="acme", max_new_tokens=4) for p in PARAPHRASES}
                        replies = await collect_replies(client, probe, timeout_s=60)
                        assert set(replies) == probe and all(r.ok for r in replies.values())
                        bypass = await _prepared_bypass(settings, probe)
                        if all(v == "" for v in bypass.values()):
                            recovered_after = time.monotonic() - restarted
                        else:
                            await asyncio.sleep(1.0)
                # Answers given during the outage were admitted once Milvus came back (nothing skipped).
                deadline = time.monotonic() + 60
                while await _count_examples(settings, "acme") < len(SEED) + len(outage):
                    assert time.monotonic() < deadline, "answers from the outage were never admitted"
                    await asyncio.sleep(1.0)
                warm_bypass = await _prepared_bypass(settings, warm)
                outage_bypass = await _prepared_bypass(settings, outage)
                warm_examples = [
                    r
                    for r in await read_topic(settings, settings.topic("prepared"))
                    if r["request"]["request_id"] in warm and r["examples"]
                ]
            finally:
                await pipeline.stop()
    finally:
        await milvus.stop()

    assert all(v == "" for v in warm_bypass.values()) and warm_examples, "selection ran before the outage"
    assert all(r.ok for r in outage.values()), [r for r in outage.values() if not r.ok]
    assert len(outage_bypass) == len(outage) and all(outage_bypass.values()), outage_bypass
    assert recovered_after is not None, "selection never came back after Milvus restarted"
    print(
        f"\nmilvus down: {len(outage)} served without examples in {outage_s:.1f}s "
        f"(bypass reasons {sorted(set(outage_bypass.values()))}); selection back {recovered_after:.1f}s "
        f"after the restart ({rounds} rounds)"
    )


async def _group_positions(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """The worker group's committed offset per (topic, partition) (absent: none committed)."""
    tps = [TopicPartition(settings.topic(t), p) for t in topics for p in range(settings.kafka.partitions)]
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.worker.app_id, partitions=tps)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def _offsets_by_id(settings: Settings, topic: str) -> dict[str, tuple[int, int]]:
    """request id (the record key) -> (partition, offset) of its first record on ``topic``."""
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        name = settings.topic(topic)
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[str, tuple[int, int]] = {}
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                for m in messages:
                    out.setdefault((m.key or b"").decode(), (tp.partition, m.offset))
        return out
    finally:
        await consumer.stop()


async def test_broker_outage_and_restart(local_stack: LocalStack, tmp_path: Path) -> None:
    """Two broker faults against one worker and its own Tansu broker.

    1. Outage without data loss (SIGSTOP for longer than the group session, then SIGCONT): what a
       Kafka broker restart looks like to clients, since Kafka keeps its log. Every request sent
       before, during and after is answered, exactly once as the client sees it, by the same worker.
    2. Restart of the memory-only Tansu broker: it comes back empty and topics are re-created. The
       worker reconnects and rejoins, and requests from a new client are served, except (documented
       in docs/reliability.md) records the new broker placed below a position the group held before
       the restart: consumers keep positions across the restart and skip those offsets.
    """
    port = free_port()
    broker = TansuBroker(port=port, log_path=tmp_path / "tansu.log")
    backends = _tiers()
    await broker.start()
    try:
        async with owned_backends(backends, tmp_path):
            pipeline = await make_pipeline(
                local_stack,
                tmp_path,
                bootstrap_servers=broker.bootstrap_servers,
                tgi=backends_section(backends),
                worker={"prepared_hop": "kafka"},  # the outage is checked on both topics' offsets
            )
            settings = pipeline.settings
            try:
                (worker,) = await start_workers(pipeline, 1)
                async with EchoClient(settings) as client:
                    # 1. outage
                    before = {
                        await client.send(f"Before {i}", tenant="acme", max_new_tokens=4) for i in range(10)
                    }
                    assert broker._process is not None
                    broker._process.send_signal(signal.SIGSTOP)
                    frozen_at = time.monotonic()
                    sending = asyncio.gather(
                        *(client.send(f"During {i}", tenant="acme", max_new_tokens=4) for i in range(10))
                    )
                    await asyncio.sleep(3 * settings.kafka.session_timeout_s + 2)
                    broker._process.send_signal(signal.SIGCONT)
                    during = set(await sending)
                    after = {
                        await client.send(f"After {i}", tenant="acme", max_new_tokens=4) for i in range(10)
                    }
                    outage = await collect_replies(client, before | during | after, timeout_s=120)
                    outage_s = time.monotonic() - frozen_at
                    outage_duplicates = client.duplicates
                old_positions = await _group_positions(settings, ("requests", "prepared"))

                # 2. restart: a new, empty broker on the same port
                await broker.stop()
                broker = TansuBroker(port=port, log_path=tmp_path / "tansu-2.log")
                await broker.start()
                restarted = time.monotonic()
                await create_topics(broker.bootstrap_servers, topic_specs(settings))
                async with EchoClient(settings) as client:
                    ids = {
                        await client.send(f"Restart {i}", tenant="acme", max_new_tokens=4) for i in range(16)
                    }
                    served = await collect_replies(client, ids, timeout_s=45)
                    restart_s = time.monotonic() - restarted
                    extra = {
                        await client.send(f"Later {i}", tenant="acme", max_new_tokens=4) for i in range(16)
                    }
                    # replies to the first 16 may still come (a slow rejoin on a busy machine): keep them
                    late = await collect_replies(client, extra | (ids - set(served)), timeout_s=60)
                    served |= {rid: r for rid, r in late.items() if rid in ids}
                    later = {rid: r for rid, r in late.items() if rid in extra}
                    placed = await _offsets_by_id(settings, "requests")
                    prepared_at = await _offsets_by_id(settings, "prepared")
                alive = worker.running
                rejoined = worker.log_path.read_text(errors="replace").count("Worker ready") >= 2
            finally:
                await pipeline.stop()
    finally:
        await broker.stop()

    everything = before | during | after
    assert set(outage) == everything, f"{len(everything - set(outage))} lost across the outage"
    assert all(r.ok for r in outage.values())
    assert alive and rejoined, worker.log_tail()
    assert served and later, "nothing was served after the broker restart"

    def below_old_position(rid: str) -> bool:
        if rid not in placed:
            return False
        p, o = placed[rid]
        if o < old_positions.get((settings.topic("requests"), p), 0):
            return True
        if rid in prepared_at:
            p, o = prepared_at[rid]
            return o < old_positions.get((settings.topic("prepared"), p), 0)
        return False

    missing = (ids | extra) - set(served) - set(later)
    lost = {rid: (placed.get(rid), prepared_at.get(rid)) for rid in missing if not below_old_position(rid)}
    # (a request missing from ``placed`` never reached the new broker's log: that is lost too)
    assert not lost, f"lost above the old positions {old_positions}: {lost} (requests, prepared offsets)"
    print(
        f"\nbroker outage: {len(everything)} answered once across a {outage_s:.1f}s freeze "
        f"({outage_duplicates} duplicates dropped by the client); restart: {len(served)}/{len(ids)} then "
        f"{len(later)}/{len(extra)} served, {len(missing)} skipped below the old positions "
        f"{sorted(old_positions.values())}, first reply {restart_s:.1f}s after the restart"
    )
