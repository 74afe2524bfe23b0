"""``EchoClient``: produce requests to Kafka and consume replies asynchronously.

    async with EchoClient(settings) as client:
        reply = await client.ask("How do I reset my password?", tenant="acme", timeout=30)
        print(reply.text)

        ids = [await client.send(p, tenant="acme") for p in prompts]   # fire and forget
        async for reply in client.replies():                            # one reply per request id
            ...

The client reads its reply topic (``echolm.replies`` or a private ``echolm.replies.<suffix>``)
without a consumer group, from the end at the time it starts, so it only sees replies to requests
sent after it connected. It delivers a reply only for a request id it is still waiting on, so a
worker that re-processes a request after a crash or rebalance and sends a second, identical reply
is dropped: "exactly one reply per request id" as the client sees it. Memory stays bounded: an id
leaves the outstanding map when answered, and only the last ``remember_answered`` answered ids are
kept, to count late duplicates (``duplicates``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.errors import ClientTimeout
from infra.kafka import kafka_client_kwargs, kafka_consumer_kwargs
from infra.settings import Settings

__all__ = ["EchoClient", "Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: str
    tenant: str
    ok: bool
    text: str
    error_code: str = ""
    error_message: str = ""
    backend: str = ""
    tier: str = ""
    n_examples: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    latency_s: float = 0.0  # send -> reply, measured by this client

    @classmethod
    def from_wire(cls, data: dict[str, Any], latency_s: float) -> Reply:
        error = data.get("error") or {}
        return cls(
            request_id=str(data.get("request_id", "")),
            tenant=str(data.get("tenant", "")),
            ok=bool(data.get("ok")),
            text=str(data.get("text", "")),
            error_code=str(error.get("code", "")),
            error_message=str(error.get("message", "")),
            backend=str(data.get("backend", "")),
            tier=str(data.get("tier", "")),
            n_examples=int(data.get("n_examples", 0)),
            timings_ms=dict(data.get("timings_ms") or {}),
            worker=str(data.get("worker", "")),
            latency_s=latency_s,
        )


class EchoClient:
    def __init__(
        self, settings: Settings, *, reply_topic: str | None = None, remember_answered: int = 100_000
    ) -> None:
        self.settings = settings
        self.request_topic = settings.topic("requests")
        self.reply_topic = reply_topic or settings.topic("replies")
        self.feedback_topic = settings.topic("feedback")
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._sent_at: dict[str, float] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._remember_answered = max(0, remember_answered)
        self._stream: asyncio.Queue[Reply] = asyncio.Queue()
        self.duplicates = 0
        self._closed = False

    async def __aenter__(self) -> EchoClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        kw = kafka_client_kwargs(self.settings)
        self._producer = AIOKafkaProducer(**kw, acks="all", linger_ms=0)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **kafka_consumer_kwargs(self.settings),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        await self._consumer.start()
        partitions = None
        for _ in range(100):
            partitions = self._consumer.partitions_for_topic(self.reply_topic)
            if partitions:
                break
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        if not partitions:
            raise RuntimeError(
                f"reply topic {self.reply_topic!r} does not exist on "
                f"{self.settings.kafka.bootstrap_servers}; run `echolm topics create` "
                "(echolm up does it for you)"
            )
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so no reply sent after this point is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="echolm-client-replies")

    async def _read(self) -> None:
        assert self._consumer is not None
        async for message in self._consumer:
            try:
                data = orjson.loads(message.value) if message.value else {}
            except orjson.JSONDecodeError:
                continue
            request_id = data.get("request_id")
            if not isinstance(request_id, str):
                continue
            if request_id in self._answered:
                self.duplicates += 1
                continue
            sent_at = self._sent_at.pop(request_id, None)
            if sent_at is None:  # not ours, or answered so long ago that it is forgotten
                continue
            self._answered[request_id] = None
            while len(self._answered) > self._remember_answered:
                self._answered.popitem(last=False)
            reply = Reply.from_wire(data, time.monotonic() - sent_at)
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(reply)
            else:
                self._stream.put_nowait(reply)

    async def send(
        self,
        prompt: str,
        *,
        tenant: str = "default",
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        no_store: bool = False,
        deadline_s: float | None = None,
        raw: bytes | None = None,
    ) -> str:
        """Produce one request; returns its id. ``raw`` sends those bytes instead (for tests of bad input)."""
        if self._producer is None:
            raise RuntimeError("EchoClient is not started; use `async with EchoClient(settings)`")
        request_id = request_id or uuid.uuid4().hex
        body: dict[str, Any] = {"request_id": request_id, "tenant": tenant, "prompt": prompt}
        if self.reply_topic != self.settings.topic("replies"):
            body["reply_topic"] = self.reply_topic
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        if no_store:
            body["no_store"] = True
        if deadline_s is not None:
            body["deadline_s"] = deadline_s
        self._sent_at[request_id] = time.monotonic()
        await self._producer.send_and_wait(
            self.request_topic, raw if raw is not None else orjson.dumps(body), key=request_id.encode()
        )
        return request_id

    async def ask(self, prompt: str, *, tenant: str = "default", timeout: float = 60.0, **kw: Any) -> Reply:
        """Send one request and wait for its reply; raises ``ClientTimeout`` after ``timeout`` seconds."""
        request_id = kw.pop("request_id", None) or uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        await self.send(prompt, tenant=tenant, request_id=request_id, **kw)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            self._pending.pop(request_id, None)
            raise ClientTimeout(
                f"no reply to request {request_id} within {timeout}s; are workers running "
                f"(`echolm up` or `echolm worker`) and consuming {self.request_topic}?"
            ) from exc

    async def feedback(self, request_id: str, score: float, *, tenant: str = "default") -> None:
        """Rate a reply: ``score`` in [0, 1] (thumbs up = 1, down = 0)."""
        if self._producer is None:
            raise RuntimeError("EchoClient is not started")
        value = {
            "request_id": request_id,
            "tenant": tenant,
            "score": float(score),
            "at": time.time(),
            "__faust": {"ns": "echolm.Feedback.v1"},
        }
        await self._producer.send_and_wait(self.feedback_topic, orjson.dumps(value), key=tenant.encode())

    async def replies(self, *, timeout: float | None = None) -> AsyncIterator[Reply]:
        """Replies to requests sent with ``send`` (not ``ask``), in arrival order, each id once."""
        while True:
            try:
                yield await asyncio.wait_for(self._stream.get(), timeout)
            except TimeoutError:
                return

    @property
    def outstanding(self) -> int:
        return len(self._sent_at)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for future in self._pending.values():
            future.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
