"""Example-bank operations: warm-start import, export, and rebuild from the log topic.

* ``import``: JSONL rows ``{"request": "...", "response": "..."}`` (``prompt`` is accepted for
  ``request``) for one tenant. Rows are embedded in batches, written to the log topic as
  ``origin="import"`` records (so a rebuild includes them) and applied to Milvus with the same
  function the ``admit`` agent uses.
* ``export``: every example of a tenant as JSONL (request, response, quality, tier, statistics).
* ``rebuild-cache``: read the whole log topic from the beginning and apply it, in order, to a
  collection: the bank is a view of the log.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from tqdm import tqdm

from agents.admit import apply_log_records
from infra.embedding import SentenceTransformerEmbedder
from infra.kafka import kafka_client_kwargs, kafka_consumer_kwargs
from infra.milvus import MilvusExampleStore
from infra.protocols import VectorStore
from infra.settings import Settings
from streams.codecs import encode_vector, register_codecs
from streams.records import LogRecord, ReplyRecord, RequestRecord, RouteInfo

__all__ = ["apply_log", "export_bank", "import_bank", "read_log", "read_topic", "rebuild_cache"]

_BATCH = 64


def _rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, orjson.loads(line)


async def import_bank(settings: Settings, path: Path, *, tenant: str, quiet: bool = False) -> int:
    register_codecs()
    if not path.is_file():
        print(
            f"error: {path} does not exist; pass a JSONL file of {{request, response}} rows", file=sys.stderr
        )
        return 2
    rows = list(_rows(path))
    bad = [
        n
        for n, r in rows
        if not isinstance(r.get("request", r.get("prompt")), str) or not isinstance(r.get("response"), str)
    ]
    if bad:
        print(
            f"error: rows {bad[:10]} lack string 'request' (or 'prompt') and 'response' fields",
            file=sys.stderr,
        )
        return 2
    large = next(b for b in settings.tgi.backends if b.tier == settings.tgi.large_tier)
    producer = AIOKafkaProducer(**kafka_client_kwargs(settings), acks="all")
    async with (
        SentenceTransformerEmbedder(settings.embedding) as embedder,
        MilvusExampleStore(settings.milvus) as store,
    ):
        await store.ensure_collection()
        await producer.start()
        try:
            bar = tqdm(total=len(rows), desc=f"import {tenant}", unit="ex", disable=quiet, file=sys.stderr)
            for i in range(0, len(rows), _BATCH):
                chunk = [r for _, r in rows[i : i + _BATCH]]
                texts = [str(r.get("request", r.get("prompt"))) for r in chunk]
                vectors = await embedder.embed(texts)
                now = time.time()
                records = []
                for text, row, vec in zip(texts, chunk, vectors, strict=True):
                    rid = f"import:{uuid.uuid4().hex}"
                    quality = row.get("quality", 0.5)
                    request = RequestRecord(
                        request_id=rid,
                        tenant=tenant,
                        prompt=text,
                        max_new_tokens=1,
                        reply_topic=settings.topic("replies"),
                        created_at=now,
                    )
                    reply = ReplyRecord(
                        request_id=rid,
                        tenant=tenant,
                        ok=True,
                        text=str(row["response"]),
                        backend=large.name,
                        tier=str(row.get("tier", large.tier)),
                    )
                    records.append(
                        LogRecord(
                            request=request,
                            embedding=encode_vector(vec),
                            examples=[],
                            route=RouteInfo(backend=large.name, tier=large.tier, reason="import"),
                            reply=reply,
                            logged_at=now,
                            origin="import",
                            quality=float(quality) if isinstance(quality, int | float) else 0.5,
                        )
                    )
                for record in records:
                    await producer.send(settings.topic("log"), record.dumps(), key=tenant.encode())
                await producer.flush()
                await apply_log_records(records, store, settings, now=now)
                bar.update(len(chunk))
            bar.close()
        finally:
            await producer.stop()
        total = await store.count(tenant)
    print(
        f"imported {len(rows)} rows for tenant {tenant!r}; the bank now holds {total} examples for it",
        file=sys.stderr,
    )
    return 0


async def export_bank(settings: Settings, out: str, *, tenant: str, quiet: bool = False) -> int:
    async with MilvusExampleStore(settings.milvus) as store:
        await store.ensure_collection()
        examples = await store.scan(tenant)
    sink = sys.stdout.buffer if out == "-" else Path(out).open("wb")  # noqa: SIM115 - closed below
    try:
        for ex in tqdm(
            examples, desc=f"export {tenant}", unit="ex", disable=quiet or out == "-", file=sys.stderr
        ):
            sink.write(
                orjson.dumps(
                    {
                        "request": ex.request,
                        "response": ex.response,
                        "quality": ex.quality,
                        "tier": ex.model_tier,
                        "example_id": ex.example_id,
                        "offloads": ex.offloads,
                        "gain": ex.gain,
                        "replay_rounds": ex.replay_rounds,
                        "created_at": ex.created_at,
                    }
                )
                + b"\n"
            )
    finally:
        if sink is not sys.stdout.buffer:
            sink.close()
    print(f"exported {len(examples)} examples of tenant {tenant!r}", file=sys.stderr)
    return 0


async def read_topic(settings: Settings, topic: str, *, timeout_s: float = 60.0) -> list[bytes]:
    """Every value on ``topic`` now, partition by partition (each partition's order kept)."""
    consumer = AIOKafkaConsumer(**kafka_consumer_kwargs(settings), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        values: list[bytes] = []
        remaining = {tp for tp in tps if ends[tp] > await consumer.position(tp)}
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for messages in batch.values():
                values.extend(m.value for m in messages if m.value)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return values
    finally:
        await consumer.stop()


async def read_log(settings: Settings) -> list[LogRecord]:
    """Every record on the log topic now, in partition order (one tenant's history stays ordered)."""
    register_codecs()
    return [LogRecord.loads(value) for value in await read_topic(settings, settings.topic("log"))]


async def apply_log(
    records: list[LogRecord], store: VectorStore, settings: Settings, *, quiet: bool = True
) -> None:
    for i in tqdm(
        range(0, len(records), _BATCH), desc="rebuild", unit="batch", disable=quiet, file=sys.stderr
    ):
        chunk = records[i : i + _BATCH]
        await apply_log_records(chunk, store, settings, now=max(r.logged_at for r in chunk))


async def rebuild_cache(settings: Settings, *, collection: str | None = None, quiet: bool = False) -> int:
    records = await read_log(settings)
    target = settings.milvus.model_copy(update={"collection": collection or settings.milvus.collection})
    async with MilvusExampleStore(target) as store:
        await store.ensure_collection()
        await apply_log(records, store, settings, quiet=quiet)
        total = await store.count()
    print(f"rebuilt {target.collection} from {len(records)} log records: {total} examples", file=sys.stderr)
    return 0
