"""Floors: each pipeline component measured alone, on the same data and settings, in the same run.

The overhead benchmark (``python -m bench.overhead --floors``) calls ``measure_floors`` after its
bank is loaded and indexed (a phase of its own) and before its pipeline phases, with the stack, bank
and settings the worker uses; ``stage_ratios`` then divides each stage of a pipeline phase by its
floor, and the end-to-end overhead by the sum of the floors.

Floors (every one a p50/p99 over ``n`` calls, taken one at a time so nothing queues):

* ``embed``: the embedder the worker is configured with (cache off), a whole batch of distinct
  prompts per call, at batch sizes ``batches``;
* ``retrieve``: ``VectorStore.search`` on the bank's tenant with the worker's ``top_k``, filter,
  output fields and consistency level, a whole batch of query vectors per call, at the same sizes;
* ``kafka_hop``: one record produced (acks=all, linger 0) and consumed by a consumer with the
  worker's ``kafka.fetch_max_wait_ms`` on the same broker, one record in flight at a time;
* ``generate``: one ``TGIGenerator.generate`` to the instant small backend, the pipeline's message
  shape, one call at a time;
* ``select`` and ``route`` are pure functions: their floors are the overhead bench's ``micro`` phase.

``milvus_sweep`` times the same search while varying one thing at a time: HNSW ``ef``, the
consistency level, and the output fields (all fields, no embedding, ids only).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import numpy as np

from infra.protocols import ChatMessage, Embedder, GenerationParams, VectorStore
from infra.settings import Settings

__all__ = [
    "embed_floor",
    "floor_for",
    "generate_floor",
    "kafka_floor",
    "measure_floors",
    "milvus_sweep",
    "search_floor",
    "stage_ratios",
]

BATCHES = (1, 4, 8, 16, 32)


def _summary(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "mean": float("nan")}
    values = np.asarray(samples, dtype=np.float64)
    return {
        "n": len(samples),
        "p50": round(float(np.percentile(values, 50)), 3),
        "p99": round(float(np.percentile(values, 99)), 3),
        "mean": round(float(values.mean()), 3),
    }


async def _timed(call: Callable[[int], Coroutine[Any, Any, object]], n: int, warmup: int = 2) -> list[float]:
    for i in range(warmup):
        await call(i)
    samples = []
    for i in range(n):
        began = time.perf_counter()
        await call(i)
        samples.append(1000 * (time.perf_counter() - began))
    return samples


async def embed_floor(
    embedder: Embedder, texts: Sequence[str], batches: Sequence[int] = BATCHES, n: int = 10
) -> dict[str, dict[str, float]]:
    """ms per ``embed`` call of a whole batch, per batch size; each call gets distinct texts."""
    out: dict[str, dict[str, float]] = {}
    for size in batches:
        chunks = [list(texts[(i * size) % len(texts) :][:size]) for i in range(n + 2)]
        chunks = [c if len(c) == size else list(texts[:size]) for c in chunks]

        async def call(i: int, chunks: list[list[str]] = chunks) -> object:
            return await embedder.embed(chunks[i % len(chunks)])

        out[str(size)] = _summary(await _timed(call, n))
    return out


async def search_floor(
    store: VectorStore,
    tenant: str,
    vectors: np.ndarray,
    *,
    limit: int,
    batches: Sequence[int] = BATCHES,
    n: int = 20,
) -> dict[str, dict[str, float]]:
    """ms per ``search`` call of a whole batch of query rows, per batch size (the store's own filter,
    output fields and the request path's consistency level)."""
    out: dict[str, dict[str, float]] = {}
    rows = vectors.shape[0]
    for size in batches:

        async def call(i: int, size: int = size) -> object:
            start = (i * size) % max(1, rows - size)
            return await store.search(tenant, vectors[start : start + size], limit=limit, stale_ok=True)

        out[str(size)] = _summary(await _timed(call, n))
    return out


async def kafka_floor(
    bootstrap: str, fetch_max_wait_ms: int, *, partitions: int = 1, n: int = 40, gap_s: float = 0.02
) -> dict[str, float]:
    """Produce (acks=all) -> consume of one small record at a time on ``bootstrap``, ms, over a topic
    of ``partitions`` partitions written in turn and all read by one consumer, as the worker reads its
    topics (an empty partition in a fetch can hold the answer until the fetch wait expires)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from infra.topics import create_topics

    topic = f"bench.floor.{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, {topic: partitions})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=fetch_max_wait_ms
    )
    await producer.start()
    await consumer.start()
    samples: list[float] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        for i in range(n + 2):
            began = time.perf_counter()
            await producer.send_and_wait(topic, b"x" * 512, partition=i % partitions)
            async with asyncio.timeout(10):
                await consumer.getone()
            if i >= 2:
                samples.append(1000 * (time.perf_counter() - began))
            await asyncio.sleep(gap_s)
    finally:
        await consumer.stop()
        await producer.stop()
    return _summary(samples) | {"fetch_max_wait_ms": fetch_max_wait_ms, "partitions": partitions}


async def generate_floor(
    settings: Settings, messages: Sequence[ChatMessage], *, n: int = 40, max_new_tokens: int = 16
) -> dict[str, Any]:
    """One ``TGIGenerator.generate`` at a time to the first non-large backend, ms."""
    from infra.tgi import TGIGenerator

    backend = next(b for b in settings.tgi.backends if b.tier != settings.tgi.large_tier)
    params = GenerationParams(max_new_tokens=max_new_tokens)
    async with TGIGenerator.from_settings(backend, settings.tgi) as generator:
        samples = await _timed(lambda _i: generator.generate(messages, params), n)
    return {"backend": backend.name, **_summary(samples)}


async def measure_floors(
    settings: Settings,
    *,
    embedder: Embedder,
    store: VectorStore,
    tenant: str,
    texts: Sequence[str],
    vectors: np.ndarray,
    messages: Sequence[ChatMessage],
    batches: Sequence[int] = BATCHES,
) -> dict[str, Any]:
    """Every floor, in the order embed, retrieve, kafka_hop, generate (see the module docstring)."""
    out: dict[str, Any] = {"batches": list(batches)}
    out["embed_ms"] = await embed_floor(embedder, texts, batches)
    out["retrieve_ms"] = await search_floor(
        store, tenant, vectors, limit=settings.selection.top_k, batches=batches
    )
    out["kafka_hop_ms"] = await kafka_floor(
        settings.kafka.bootstrap_servers,
        settings.kafka.fetch_max_wait_ms,
        partitions=settings.kafka.partitions,
    )
    out["generate_ms"] = await generate_floor(settings, messages)
    return out


def floor_for(by_batch: Mapping[str, Mapping[str, float]], batch: float) -> dict[str, float]:
    """The floor measured at the smallest batch size >= ``batch`` (the largest if none is)."""
    sizes = sorted(int(k) for k in by_batch)
    pick = next((s for s in sizes if s >= batch), sizes[-1])
    return {"batch": pick, **by_batch[str(pick)]}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def stage_ratios(
    phase: Mapping[str, Any],
    floors: Mapping[str, Any],
    micro: Mapping[str, Any] | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """Per stage of one pipeline phase: p50 / floor p50 (embed and retrieve at the phase's median
    embed batch), and end-to-end overhead p50 against the sum of the floors (generate excluded).

    The sum counts every Kafka hop a request crosses: client -> prepare and the reply back, plus the
    prepared topic when the phase has a ``kafka_hop`` (``worker.prepared_hop = "kafka"``)."""
    stages = phase["stages_ms"]
    batch = float(phase.get("embed_batches", {}).get("p50") or 1)
    hop = floors["kafka_hop_ms"]["p50"]
    floor_p50: dict[str, float] = {
        "embed": floor_for(floors.get("embed_ms_by_backend", {}).get(backend, floors["embed_ms"]), batch)[
            "p50"
        ],
        "retrieve": floor_for(floors["retrieve_ms"], batch)["p50"],
    }
    hops = 2
    if _finite(stages.get("kafka_hop", {}).get("p50")):
        floor_p50["kafka_hop"] = hop
        hops = 3
    if micro:
        floor_p50["select"] = micro["select_examples_us"]["p50"] / 1000
        floor_p50["route"] = micro["route_us"]["p50"] / 1000
    out: dict[str, Any] = {"embed_batch_p50": batch, "floor_p50_ms": floor_p50, "ratio_p50": {}, "hops": hops}
    for stage, floor in floor_p50.items():
        measured = stages.get(stage, {}).get("p50")
        if _finite(measured) and floor > 0:
            out["ratio_p50"][stage] = round(measured / floor, 2)
    floor_sum = sum(v for k, v in floor_p50.items() if k != "kafka_hop") + hops * hop
    overhead = phase["overhead_ms"]["p50"]
    out["sum_of_floors_ms"] = round(floor_sum, 3)
    out["overhead_p50_ms"] = overhead
    out["overhead_over_floors"] = round(overhead / floor_sum, 2) if floor_sum > 0 else None
    return out


async def milvus_sweep(
    uri: str,
    collection: str,
    tenant: str,
    vectors: np.ndarray,
    *,
    limit: int,
    batches: Sequence[int] = (1, 16),
    efs: Sequence[int] = (20, 32, 64, 128),
    levels: Sequence[str] = ("Strong", "Session", "Bounded", "Eventually"),
    n: int = 20,
) -> dict[str, Any]:
    """One raw ``AsyncMilvusClient.search`` per row of the sweep: ef, consistency, output fields."""
    from pymilvus import AsyncMilvusClient

    from infra.milvus_schema import ALL_FIELDS, tenant_filter

    client = AsyncMilvusClient(uri=uri)
    where = tenant_filter(tenant) + " and usable == true"
    no_vector = [f for f in ALL_FIELDS if f != "embedding"]

    def config(ef: int, level: str, fields: list[str]) -> tuple[str, dict[str, Any]]:
        return f"ef={ef} {level} {'all' if fields == ALL_FIELDS else 'no-vector' if fields else 'ids'}", {
            "search_params": {"metric_type": "COSINE", "params": {"ef": max(ef, limit)}},
            "consistency_level": level,
            "output_fields": fields,
        }

    configs = [config(ef, "Session", list(ALL_FIELDS)) for ef in efs]
    configs += [config(64, level, list(ALL_FIELDS)) for level in levels if level != "Session"]
    configs += [config(64, "Session", no_vector), config(64, "Session", [])]
    out: dict[str, Any] = {}
    try:
        for size in batches:
            for name, kwargs in configs:

                async def call(i: int, size: int = size, kwargs: dict[str, Any] = kwargs) -> object:
                    start = (i * size) % max(1, vectors.shape[0] - size)
                    return await client.search(
                        collection, data=vectors[start : start + size].tolist(), anns_field="embedding",
                        filter=where, limit=limit, **kwargs,
                    )  # fmt: skip

                out[f"batch {size}: {name}"] = _summary(await _timed(call, n))
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return out
