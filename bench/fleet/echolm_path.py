"""echolm's side of the fleet: the bank seeded into its collection, its log topic read back (tier and
examples per request), and the handler that serves a schedule through ``EchoClient``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from bench.baselines import Scheduled
from bench.calibrate import QualityModel
from bench.fleet.preset import LARGE, TENANT
from bench.fleet.quality import condition_of
from bench.fleet.workbench import bank_answer
from bench.report import RequestResult

__all__ = ["LogWatcher", "bank_examples", "seed_bank", "serve_echolm"]


def bank_examples(bank: Sequence[tuple[str, str]], vectors: np.ndarray, tokens: int, now: float) -> list[Any]:
    """The bank (request text, group) as ``Example``s with stand-in large answers of ``tokens`` tokens."""
    from agents.policy.admission import example_id
    from infra.protocols import Example

    return [
        Example(
            example_id=example_id(TENANT, text),
            tenant=TENANT,
            request=text,
            response=bank_answer(text, tokens),
            embedding=vectors[i].astype(np.float32),
            model_tier=LARGE,
            quality=0.5,
            created_at=now,
            updated_at=now,
        )
        for i, (text, _group) in enumerate(bank)
    ]


async def seed_bank(settings: Any, bank: Sequence[tuple[str, str]], vectors: np.ndarray, tokens: int) -> int:
    """Write the bank (request text, group) with stand-in large answers into this system's collection."""
    from infra.milvus import MilvusExampleStore

    examples = bank_examples(bank, vectors, tokens, time.time())
    async with MilvusExampleStore(settings.milvus) as store:
        for i in range(0, len(examples), 256):
            await store.upsert(examples[i : i + 256])
        return await store.count(TENANT)


class LogWatcher:
    """Reads echolm's log topic while a system runs: per request id, the tier and example ids used."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.seen: dict[str, tuple[str, list[str]]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LogWatcher:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from infra.kafka import kafka_consumer_kwargs

        topic = self.settings.topic("log")
        self._consumer = AIOKafkaConsumer(
            **kafka_consumer_kwargs(self.settings),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(topic) or set()
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        import orjson

        async for message in self._consumer:
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                data = orjson.loads(message.value)
                if data.get("origin", "serve") != "serve":
                    continue
                rid = data["request"]["request_id"]
                self.seen[rid] = (
                    str(data["reply"]["tier"]),
                    [str(e["example_id"]) for e in data.get("examples") or []],
                )
                self._events.setdefault(rid, asyncio.Event()).set()

    async def wait(self, request_id: str, timeout_s: float) -> tuple[str, list[str]] | None:
        event = self._events.setdefault(request_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
        return self.seen.get(request_id)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def serve_echolm(
    client: Any,
    watcher: LogWatcher,
    *,
    system: str,
    phase: str,
    quality: QualityModel,
    group_of: Mapping[str, str],
    feedback_rate: float,
    rng: np.random.Generator,
    timeout_s: float,
) -> Callable[[Scheduled, Callable[[], float]], Any]:
    from infra.errors import ClientTimeout

    async def handle(item: Scheduled, clock: Callable[[], float]) -> RequestResult:
        sent = clock()
        try:
            reply = await client.ask(
                item.text,
                tenant=TENANT,
                timeout=timeout_s,
                request_id=item.request_id,
                max_new_tokens=item.max_new_tokens,
            )
        except ClientTimeout:
            reply = None
        done = clock()
        failed = RequestResult(
            system=system,
            phase=phase,
            request_id=item.request_id,
            group_id=item.group_id,
            arrival_s=item.at,
            sent_s=sent,
            done_s=None,
            ok=False,
        )
        if reply is None or not reply.ok:
            return failed
        logged = await watcher.wait(item.request_id, timeout_s=10.0)
        example_ids = logged[1] if logged is not None else (["?"] * reply.n_examples)
        condition = condition_of(
            tier=reply.tier,
            large_tier=LARGE,
            example_ids=example_ids if reply.tier != LARGE else [],
            group_of=group_of,
            group=item.group_id,
        )
        q = quality.quality(condition)
        if feedback_rate > 0 and rng.random() < feedback_rate:
            await client.feedback(item.request_id, float(rng.random() < q), tenant=TENANT)
        generate = reply.timings_ms.get("generate")
        return replace(
            failed,
            done_s=done,
            ok=True,
            tier=reply.tier,
            backend=reply.backend,
            n_examples=reply.n_examples,
            condition=condition,
            quality=q,
            generate_ms=float(generate) if generate is not None else None,
            stages_ms={k: float(v) for k, v in reply.timings_ms.items() if isinstance(v, int | float)},
        )

    return handle
