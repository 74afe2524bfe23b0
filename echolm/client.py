"""``EchoClient``: produce requests to Kafka and consume replies asynchronously.

    async with EchoClient(settings) as client:
        reply = await client.ask("How do I reset my password?", tenant="acme", timeout=30)
        print(reply.text)

        ids = [await client.send(p, tenant="acme") for p in prompts]   # fire and forget
        async for reply in client.replies():                            # one reply per request id
            ...

The client reads its reply topic (``echolm.replies`` or a private ``echolm.replies.<suffix>``).
By default it has no consumer group and reads from the end at the time it starts, so it only sees
replies to requests sent after it connected. With ``client.group_id`` set it reads in that consumer
group and commits its position after every batch it has handed out, so a restarted client resumes its
reply topic where it stopped and delivers the replies that arrived while it was down (``replies()``),
also for requests its previous run sent. Use a group id only with a private reply topic: on the
shared one it would adopt every client's replies.

It delivers a reply only for a request id it is still waiting on, so a worker that re-processes a
request after a crash or rebalance and sends a second, identical reply is dropped: "exactly one
reply per request id" as the client sees it. Memory is bounded (``echolm/pending.py``): an unanswered
request expires at its deadline plus ``client.reply_grace_s`` (an ``ask()`` that times out expires
at once), at most ``client.max_outstanding`` requests wait at a time, and a reply that arrives after
its request expired is dropped and counted (``late_replies``), never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from infra.errors import ClientTimeout
from infra.kafka import kafka_client_kwargs, kafka_consumer_kwargs
from infra.settings import Settings
from infra.signing import sign
from streams.records import feedback_fields

from .pending import Outcome, ReplyTracker
from .streaming import StreamAssembler

__all__ = ["Delta", "EchoClient", "Reply"]

log = logging.getLogger(__name__)


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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # stop | length; "" on error replies

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
            prompt_tokens=int(data.get("prompt_tokens") or 0),
            completion_tokens=int(data.get("completion_tokens") or 0),
            finish_reason=str(data.get("finish_reason") or ""),
        )


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of a streamed reply (``EchoClient.stream``). The last one carries the final ``reply``
    (its ``text`` is the part of the reply not streamed before); the ones before it have none."""

    text: str
    reply: Reply | None = None


class EchoClient:
    def __init__(
        self,
        settings: Settings,
        *,
        reply_topic: str | None = None,
        remember_answered: int | None = None,
        group_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.request_topic = settings.topic("requests")
        self.reply_topic = reply_topic or settings.topic("replies")
        self.feedback_topic = settings.topic("feedback")
        self.group_id = group_id or settings.client.group_id
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        limits = settings.client
        self._tracker = ReplyTracker(
            max_outstanding=limits.max_outstanding,
            remember_answered=limits.remember_answered if remember_answered is None else remember_answered,
            remember_expired=limits.remember_expired,
            adopt_unknown=self.group_id is not None,
        )
        self._stream: asyncio.Queue[Reply] = asyncio.Queue()
        # request id -> what ``stream()`` waits on: chunk records (dicts) and then the final Reply
        self._streams: dict[str, asyncio.Queue[dict[str, Any] | Reply]] = {}
        self.commit_failures = 0
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
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest",  # a new group (or none) starts at the end
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
        if self.group_id is None:
            await self._consumer.seek_to_end(*tps)
        # resolve positions now (the group's committed offsets, else the end), so no reply sent
        # after this point is missed
        for tp in tps:
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="echolm-client-replies")

    async def _read(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for messages in batches.values():
                for message in messages:
                    self._take(message.value)
            self._expire_due()
            if self.group_id is not None and batches:
                await self._commit()

    def _take(self, value: bytes | None) -> None:
        try:
            data = orjson.loads(value) if value else {}
        except orjson.JSONDecodeError:
            return
        request_id = data.get("request_id") if isinstance(data, dict) else None
        if not isinstance(request_id, str):
            return
        if data.get("kind") == "chunk":  # a piece of a streaming reply: never resolves the request
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(data)
            return
        resolution = self._tracker.resolve(request_id, now=time.monotonic())
        if resolution.outcome is not Outcome.DELIVER:
            return
        reply = Reply.from_wire(data, resolution.latency_s)
        streaming = self._streams.get(request_id)
        future = self._pending.pop(request_id, None)
        if streaming is not None:
            streaming.put_nowait(reply)
        elif future is not None and not future.done():
            future.set_result(reply)
        else:
            self._stream.put_nowait(reply)

    def _expire_due(self) -> None:
        for request_id in self._tracker.expire(time.monotonic()):
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(ClientTimeout(f"request {request_id} expired without a reply"))

    async def _commit(self) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.commit()
        except KafkaError as exc:  # the next batch commits again; a restart may re-read a few replies
            self.commit_failures += 1
            log.warning("committing the reply topic position failed: %s", exc)

    def _sign(self, body: dict[str, Any], tenant: str) -> None:
        """Sign ``body`` for ``tenant`` when tenants are signed and this client holds its secret."""
        secret = self.settings.limits.tenant_secret(tenant)
        if secret is not None:
            body["signature"] = sign(body, secret)

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
        expires_in_s: float | None = None,
    ) -> str:
        """Produce one request; returns its id. ``raw`` sends those bytes instead (for tests of bad input).

        The client waits for its reply until ``expires_in_s`` (default: the deadline, else
        ``limits.default_deadline_s``, plus ``client.reply_grace_s``); a later reply is dropped as late.
        """
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
        self._sign(body, tenant)
        now = time.monotonic()
        self._expire_due()
        if expires_in_s is None:
            expires_in_s = (
                deadline_s or self.settings.limits.default_deadline_s
            ) + self.settings.client.reply_grace_s
        self._tracker.track(request_id, now=now, expires_at=now + expires_in_s)
        try:
            await self._producer.send_and_wait(
                self.request_topic, raw if raw is not None else orjson.dumps(body), key=request_id.encode()
            )
        except BaseException:
            self._tracker.abandon(request_id)
            raise
        return request_id

    async def ask(self, prompt: str, *, tenant: str = "default", timeout: float = 60.0, **kw: Any) -> Reply:
        """Send one request and wait for its reply; raises ``ClientTimeout`` after ``timeout`` seconds."""
        request_id = kw.pop("request_id", None) or uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.send(prompt, tenant=tenant, request_id=request_id, expires_in_s=timeout, **kw)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise ClientTimeout(
                f"no reply to request {request_id} within {timeout}s; are workers running "
                f"(`echolm up` or `echolm worker`) and consuming {self.request_topic}?"
            ) from exc
        finally:  # answered, timed out or cancelled: nothing about this id stays behind
            self._pending.pop(request_id, None)
            self._tracker.abandon(request_id)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        tenant: str = "default",
        timeout: float = 60.0,
        request_id: str | None = None,
        max_tokens: int | None = None,
        raw: bytes | None = None,
    ) -> AsyncGenerator[Delta, None]:
        """Send one streaming request and yield its reply as it is generated: ``Delta`` pieces, the
        last with the final ``Reply`` (check ``reply.ok``). ``messages`` (chat turns) or ``prompt``
        (one user turn); ``raw`` sends those bytes as the whole v2 record (the gateway does).

        Text of an abandoned attempt is never shown twice (``echolm.streaming``); a retry that
        disagrees with what was shown raises ``StreamDiverged``. ``ClientTimeout`` after ``timeout``.
        """
        request_id = request_id or uuid.uuid4().hex
        if raw is None:
            turns = list(messages) if messages is not None else [{"role": "user", "content": prompt or ""}]
            body: dict[str, Any] = {
                "version": 2,
                "request_id": request_id,
                "tenant": tenant,
                "messages": [dict(t) for t in turns],
                "stream": True,
                "deadline_s": timeout,
            }
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if self.reply_topic != self.settings.topic("replies"):
                body["reply_topic"] = self.reply_topic
            self._sign(body, tenant)
            raw = orjson.dumps(body)
        queue: asyncio.Queue[dict[str, Any] | Reply] = asyncio.Queue()
        self._streams[request_id] = queue
        assembler = StreamAssembler()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.send(prompt or "", tenant=tenant, request_id=request_id, expires_in_s=timeout, raw=raw)
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError as exc:
                    raise ClientTimeout(
                        f"the streamed reply to request {request_id} did not finish within {timeout}s"
                    ) from exc
                if isinstance(item, Reply):
                    rest = assembler.final(item.text) if item.ok else ""
                    yield Delta(rest, item)
                    return
                if item.get("tenant") != tenant:  # never show one tenant's text to another
                    continue
                text = assembler.chunk(
                    str(item.get("attempt", "")), int(item.get("seq", 0)), str(item.get("text", ""))
                )
                if text:
                    yield Delta(text)
        finally:
            self._streams.pop(request_id, None)
            self._tracker.abandon(request_id)

    async def feedback(
        self, request_id: str, score: float, *, tenant: str = "default", rater: str = ""
    ) -> None:
        """Rate a reply: ``score`` in [0, 1] (thumbs up = 1, down = 0). One rating per
        (``request_id``, ``rater``) is applied; sending it again changes nothing."""
        if self._producer is None:
            raise RuntimeError("EchoClient is not started")
        value: dict[str, Any] = feedback_fields(
            request_id=request_id, tenant=tenant, score=score, rater=rater, at=time.time()
        )
        self._sign(value, tenant)
        value["__faust"] = {"ns": "echolm.Feedback.v1"}
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
        """Requests sent and still waiting for a reply (not yet answered or expired)."""
        return self._tracker.outstanding

    @property
    def duplicates(self) -> int:
        """Replies dropped because their request id was already answered."""
        return self._tracker.duplicates

    @property
    def late_replies(self) -> int:
        """Replies dropped because their request had expired (deadline passed, or ask() gave up)."""
        return self._tracker.late

    @property
    def expired(self) -> int:
        """Requests that expired without a reply."""
        return self._tracker.expired

    def sizes(self) -> dict[str, int]:
        """Entries held by each of the client's structures (tests assert they stay bounded)."""
        return {
            **self._tracker.sizes(),
            "waiters": len(self._pending),
            "unread": self._stream.qsize(),
            "streams": len(self._streams),
        }

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
            if self.group_id is not None:
                await self._commit()
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
