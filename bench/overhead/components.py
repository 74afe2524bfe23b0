"""Each component alone, in the same run as the pipeline: the pure decisions (µs), MiniLM at several
batch sizes, the emulated backend without echolm, and the broker's produce -> consume floor.

Issue 9's same-run floors (MiniLM encode, Milvus search, aiokafka round trip, one TGI call) belong
beside these, in their own module (``bench/overhead/floors.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.policy.retrieval import SelectionResult, UtilityModel, select_examples
from agents.policy.routing import BackendView, LinUCBBandit, choose_backend, context_features
from bench.stats import summary
from infra.embedding import SentenceTransformerEmbedder
from infra.protocols import Example, GenerationParams, QueueDepth, SearchHit
from infra.settings import Settings
from infra.tgi import TGIGenerator
from infra.topics import create_topics

__all__ = ["direct_baseline", "embed_batching", "fetch_wait_floor", "micro"]


def _timed_us(call: Any, iterations: int) -> dict[str, float]:
    samples = []
    for i in range(iterations):
        t0 = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return summary(samples)


def micro(
    settings: Settings, real: np.ndarray, bank: list[Example], queries: list[tuple[str, np.ndarray]], n: int
) -> tuple[dict[str, Any], list[list[SearchHit]]]:
    """Selection and routing as pure functions (µs). Hits: exact top-20 cosine over the real rows."""
    top_k, sel, now = settings.selection.top_k, settings.selection, time.time()
    hit_sets = []
    for _, vector in queries:
        sims = real @ vector
        best = np.argsort(-sims)[:top_k]
        hit_sets.append([SearchHit(bank[j], float(sims[j])) for j in best])
    scorer = UtilityModel.prior(sel.prior_similarity)
    results: list[SelectionResult | None] = [None] * len(queries)

    def select(i: int) -> None:
        k = i % len(queries)
        results[k] = select_examples(
            queries[k][1], queries[k][0], hit_sets[k], scorer=scorer, threshold=sel.utility_threshold,
            max_examples=sel.max_examples, min_similarity=sel.min_similarity,
            duplicate_similarity=sel.duplicate_similarity, diversity=sel.diversity, token_budget=1024,
            target_tier="small", now=now, large_tier=settings.tgi.large_tier, tenant="bench",
        )  # fmt: skip

    selection = _timed_us(select, n)
    chosen = [list(r.selected) if r is not None else [] for r in results]
    bandit = LinUCBBandit.from_settings(
        settings.tgi.backends, settings.routing, large_tier=settings.tgi.large_tier
    )
    views = tuple(BackendView.from_settings(b) for b in settings.tgi.backends)
    mono = time.monotonic()
    depths = {b.name: QueueDepth(b.name, waiting=1.0, running=2.0, at=mono) for b in views}

    def route(i: int) -> None:
        k = i % len(queries)
        context = context_features(queries[k][1], chosen[k], prompt_text=queries[k][0])
        choose_backend(
            estimates=bandit.expected(context), backends=views, depths=depths, now=mono,
            stale_after_s=settings.tgi.stale_after_s, settings=settings.routing,
        )  # fmt: skip

    routing = _timed_us(route, n)
    both = [selection["p50"] + routing["p50"], selection["p99"] + routing["p99"]]
    return {
        "iterations": n,
        "select_examples_us": selection,
        "route_us": routing,
        "select_plus_route_us": {"p50": both[0], "p99": both[1]},
        "mean_selected": float(np.mean([len(c) for c in chosen])),
    }, hit_sets


async def embed_batching(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """Per-sentence MiniLM cost at batch 1, 16 and 32, with the worker's embedding settings and with
    ``embedding.threads=2`` (which gives torch one intra-op thread: ``cores // threads``)."""
    out: dict[str, Any] = {}
    for threads in sorted({settings.embedding.threads, 2}):
        async with SentenceTransformerEmbedder(
            settings.embedding.model_copy(update={"threads": threads})
        ) as e:
            row: dict[str, float] = {}
            for size in (1, 16, 32):
                await e.embed(texts[:size])
                began = time.perf_counter()
                for i in range(0, len(texts), size):
                    await e.embed(texts[i : i + size])
                row[f"batch_{size}"] = 1000 * (time.perf_counter() - began) / len(texts)
            out[f"embedding.threads={threads} (torch {max(1, (os.cpu_count() or 1) // threads)})"] = row
    return out


async def direct_baseline(
    settings: Settings, messages: list[Any], rate: float, duration_s: float, max_new_tokens: int
) -> dict[str, Any]:
    """Client -> emulated backend with the adapter the worker uses; no echolm in between."""
    backend = next(b for b in settings.tgi.backends if b.tier != settings.tgi.large_tier)
    samples: list[float] = []
    params = GenerationParams(max_new_tokens=max_new_tokens)
    async with TGIGenerator.from_settings(backend, settings.tgi) as generator:
        await generator.generate(messages, params)

        async def one() -> None:
            t0 = time.perf_counter()
            await generator.generate(messages, params)
            samples.append(1000 * (time.perf_counter() - t0))

        tasks, start, count = [], time.perf_counter(), int(rate * duration_s)
        for i in tqdm(range(count), desc="direct baseline", unit="req"):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return {"backend": backend.name, "rate": rate, "latency_ms": summary(samples)}


async def fetch_wait_floor(
    bootstrap: str, waits_ms: Sequence[int], n: int = 40, gap_s: float = 0.05
) -> dict[str, Any]:
    """Produce -> consume latency on the broker alone, per consumer ``fetch_max_wait_ms``: the floor of
    every Kafka hop in the pipeline (faust's worker consumer uses 1500 ms, EchoClient aiokafka's 500)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    out: dict[str, Any] = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for wait_ms in waits_ms:
            topic = f"bench.fetchwait.{wait_ms}.{uuid.uuid4().hex[:6]}"
            await create_topics(bootstrap, {topic: 4})
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=wait_ms)
            await consumer.start()
            partitions = [TopicPartition(topic, p) for p in range(4)]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
            latencies: list[float] = []

            async def read(consumer: AIOKafkaConsumer = consumer, latencies: list[float] = latencies) -> None:
                async for message in consumer:
                    latencies.append(1000 * (time.time() - float(message.value or b"0")))
                    if len(latencies) == n:
                        return

            reader = asyncio.create_task(read())
            for i in range(n):
                await producer.send_and_wait(topic, repr(time.time()).encode(), partition=i % 4)
                await asyncio.sleep(gap_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, 10)
            await consumer.stop()
            out[str(wait_ms)] = summary(latencies) | {"max": max(latencies, default=float("nan"))}
    finally:
        await producer.stop()
    return out
