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
import time
from pathlib import Path

import pytest

from echolm.client import EchoClient, Reply
from infra.workers import WorkerProcess

from .conftest import PipelineFactory
from .fleet import (
    OwnedBackend,
    backends_section,
    collect_replies,
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


# ------------------------------------------------------------------------------- worker crash
async def test_sigkill_mid_stream_every_request_answered_exactly_once(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    n, rate = 500, 50.0  # 10 s of traffic; the kill lands about 2 s in
    backends = _tiers()
    async with owned_backends(backends, tmp_path):
        pipeline = await pipeline_factory(workers=0, tgi=backends_section(backends))
        settings = pipeline.settings
        victim, survivor = await start_workers(pipeline, 2)
        got: dict[str, Reply] = {}
        ids: list[str] = []
        replacement: asyncio.Task[list[WorkerProcess]] | None = None
        killed_at = 0.0
        async with EchoClient(settings) as client:

            async def read() -> None:
                async for reply in client.replies():
                    got[reply.request_id] = reply

            reader = asyncio.create_task(read())
            began = time.monotonic()
            for i in range(n):
                ids.append(await client.send(f"Stream item {i}: say ok.", tenant="acme", max_new_tokens=4))
                if replacement is None and len(got) >= 80:
                    victim.kill()
                    killed_at = time.monotonic()
                    replacement = asyncio.create_task(start_workers(pipeline, 1))
                await asyncio.sleep(max(0.0, began + (i + 1) / rate - time.monotonic()))
            assert replacement is not None, "the victim was never killed: too few replies too early"
            (fresh,) = await replacement
            await collect_replies(client, set(ids), timeout_s=90, into=got)
            reader.cancel()
            client_duplicates = client.duplicates
        await asyncio.sleep(1.0)  # let late duplicates land before reading the topics

        replies = await read_topic(settings, settings.topic("replies"))
        logs = await read_topic(settings, settings.topic("log"))
        prepared = await read_topic(settings, settings.topic("prepared"))

    # The client's view: every request answered, each exactly once, all successfully.
    assert set(got) == set(ids), f"{len(set(ids) - set(got))} requests never answered"
    assert all(r.ok for r in got.values()), [r for r in got.values() if not r.ok][:3]
    pids = {worker_pid(r) for r in got.values()}
    assert victim.pid in pids and survivor.pid in pids, pids
    wire = per_id(replies)
    assert all(wire[i] >= 1 for i in ids)
    wire_duplicates = sum(c - 1 for c in wire.values())
    assert client_duplicates <= wire_duplicates
    log_counts = per_id(r["request"] for r in logs)
    prepared_counts = per_id(r["request"] for r in prepared)
    print(
        f"\nsigkill: {n} requests, victim pid {victim.pid} killed {killed_at - began:.1f}s in, replacement "
        f"pid {fresh.pid}; replies on the wire {sum(wire.values())} ({wire_duplicates} duplicates), "
        f"client dropped {client_duplicates}; re-processed: {sum(c - 1 for c in prepared_counts.values())} "
        f"prepare, {sum(c - 1 for c in log_counts.values())} serve"
    )


# ------------------------------------------------------------------------- graceful shutdown
async def test_sigterm_drains_in_flight_within_grace(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    # About 1.3 s per request (160 ms per token, 8 tokens), 8 at a time per worker.
    backends = _tiers(decode_ms_per_token=160.0)
    grace = 6.0
    async with owned_backends(backends, tmp_path):
        pipeline = await pipeline_factory(workers=0, tgi=backends_section(backends))
        settings = pipeline.settings
        leaving, staying = await start_workers(pipeline, 2, shutdown_grace_s=grace)
        async with EchoClient(settings) as client:
            ids = [
                await client.send(f"Drain item {i}: say ok.", tenant="acme", max_new_tokens=8)
                for i in range(60)
            ]
            got: dict[str, Reply] = {}
            # Wait until the leaving worker has answered something, so it surely holds work in flight.
            deadline = time.monotonic() + 60
            while not any(worker_pid(r) == leaving.pid for r in got.values()):
                assert time.monotonic() < deadline
                await collect_replies(client, set(ids), timeout_s=0.2, into=got)
            signalled = time.monotonic()
            stopping = asyncio.create_task(leaving.stop(timeout_s=grace + 20))
            arrivals: dict[str, float] = {}
            while not set(ids) <= got.keys() and time.monotonic() < signalled + 120:
                before = set(got)
                await collect_replies(client, set(ids), timeout_s=0.2, into=got)
                for rid in set(got) - before:
                    arrivals[rid] = time.monotonic()
            exit_code = await stopping
            exited = time.monotonic()

    assert set(got) == set(ids), f"{len(set(ids) - set(got))} requests never answered"
    assert all(r.ok for r in got.values())
    counts = shutdown_counts(leaving.log_path.read_text(errors="replace"))
    assert counts is not None, leaving.log_tail()
    in_flight, drained, abandoned = counts
    assert in_flight > 0 and drained == in_flight and abandoned == 0, counts
    late = [rid for rid, at in arrivals.items() if worker_pid(got[rid]) == leaving.pid]
    assert all(arrivals[rid] - signalled <= grace + 1.0 for rid in late), (
        "a drained reply came after the grace"
    )
    assert any(worker_pid(got[rid]) == staying.pid for rid in arrivals), "the rest moved to the other worker"
    assert exit_code is not None and exited - signalled < grace + 15
    print(
        f"\nsigterm: {in_flight} in flight at the signal, all drained; {len(late)} answered by the leaving "
        f"worker after the signal, {sum(worker_pid(got[r]) == staying.pid for r in arrivals)} by the other; "
        f"exit {exit_code} after {exited - signalled:.1f}s"
    )
