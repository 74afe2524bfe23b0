"""Stage 1 agent, ``prepare``: parse -> embed -> retrieve -> select -> send, in batches.

Why batches: the embedding model is the only CPU-heavy step of the control plane and is about 3x
cheaper per sentence at batch 16 than at batch 1 (docs/architecture.md). ``stream.take_events``
collects up to ``embedding.batch_size`` requests or waits ``embedding.batch_window_s``.

``prepare`` also computes the router's bandit context from the examples it selected (their real
similarity, utility and quality) and ships it in the ``PreparedRecord``: ``serve`` routes on it
without decoding the embedding or rebuilding examples from their wire form.

Error policy:
    * ``BadInput`` (decode, schema, limits, tenant, reply topic) -> error reply + dead letter, go on.
    * embedder or Milvus unavailable -> the request goes on with no examples (``selection_bypassed``
      says why, ``echolm_selection_bypass_total`` counts it); it is never dropped.
    * anything else a batch raises -> its records are prepared again one at a time under the guard
      (agents/guard.py): the one that fails gets an error reply (``internal``) where its raw record
      names a reply address, and a dead letter with topic, partition, offset and the stage it reached
      (``parse``, ``embed``, ``retrieve``, ``select``, ``send``); the rest go on. With the inline hop,
      a serve that raises is answered the same way. Cancellation (shutdown) is not a failure.

In one process (``worker.prepared_hop = "inline"``), step 5 hands each record to serve's handler
directly instead of the prepared topic (``Preparer._hand_over``); the offset is then committed only
after the reply and the log record are delivered.

Ordering (reply-then-commit), per batch; ``Preparer.handle_batch`` runs steps 1-5 in this order:
    1. parse every record; reject bad ones (each rejection awaited to the broker),
    2. embed the valid ones' prompts in one call,
    3. retrieve candidates, one search per tenant,
    4. select examples per request (pure) and build its PreparedRecord with the routing context,
    5. send one PreparedRecord per request and await every delivery,
then the batch's events are released to the ``AckGate`` (agents/guard.py), which acks them in offset
order; ``take_events``' own ack (made even when the body is cancelled) cannot commit them alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import faust
import numpy as np

from agents.policy.retrieval import Selected, select_examples
from agents.policy.routing import context_features
from infra.errors import BadInput, DependencyUnavailable, UnknownReplyTopic
from infra.protocols import SearchHit, Vector
from infra.resources import Resources
from streams.codecs import encode_vector
from streams.records import ExampleRef, PreparedRecord, ReplyAddress, RequestRecord, parse_request
from streams.topology import Topics

from .guard import AckGate, Guard, mark
from .reject import Coordinates, Rejecter
from .state import DecisionState

__all__ = ["register_prepare"]

log = logging.getLogger(__name__)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass
class _Batch:
    """What steps 2-4 learn about the valid requests of one batch."""

    requests: list[RequestRecord]
    coordinates: list[Coordinates]
    events: list[faust.EventT[bytes]]
    vectors: np.ndarray | None = None
    hits: list[list[SearchHit]] = field(default_factory=list)
    bypass: str = ""  # why selection was skipped for the whole batch ("" = it was not)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, per request
    now: float = 0.0  # unix seconds at selection, one value for the batch

    def vector(self, i: int) -> Vector | None:
        return self.vectors[i] if self.vectors is not None else None


def _example_refs(selected: Sequence[Selected]) -> list[ExampleRef]:
    """The wire form of the chosen examples, with every field the stage-2 features read."""
    return [
        ExampleRef(
            example_id=s.example.example_id,
            request=s.example.request,
            response=s.example.response,
            similarity=float(s.similarity),
            utility=float(s.utility),
            model_tier=s.example.model_tier,
            quality=float(s.example.quality),
            replay_rounds=int(s.example.replay_rounds),
            created_at=float(s.example.created_at),
            tenant=s.example.tenant,
        )
        for s in selected
    ]


class Preparer:
    def __init__(
        self,
        app: faust.App,
        topics: Topics,
        res: Resources,
        state: DecisionState,
        *,
        handoff: Callable[[PreparedRecord], Awaitable[None]] | None = None,
    ) -> None:
        """``handoff`` None sends prepared records to the prepared topic; else step 5 hands each one
        to ``handoff`` (``Server.handle`` in this process) instead: see ``_hand_over``."""
        self.app, self.topics, self.res, self.state = app, topics, res, state
        self.rejecter = Rejecter(app, topics, res)
        self.guard = Guard(res, self.rejecter)
        self.default_reply = res.settings.topic("replies")
        self.handoff = handoff
        self._slots = asyncio.Semaphore(res.settings.worker.concurrency)
        self._serving: set[asyncio.Task[None]] = set()
        self._failed: BaseException | None = None

    async def handle_batch(self, events: Sequence[faust.EventT[bytes]]) -> None:
        """Steps 1-5 of the module docstring, for one batch of raw request events."""
        if self._failed is not None:  # an in-process serve task raised: let the supervisor see it
            failed, self._failed = self._failed, None
            raise failed
        t0 = time.perf_counter()
        mark("parse")
        valid = await self._parse(events)  # 1. parse
        if not valid:
            return
        batch = _Batch(
            requests=[r for r, _, _ in valid],
            coordinates=[c for _, c, _ in valid],
            events=[e for _, _, e in valid],
        )
        batch.seconds["parse"] = (time.perf_counter() - t0) / max(1, len(events))
        await self._embed(batch)  # 2. embed
        await self._retrieve(batch)  # 3. retrieve
        batch.now = time.time()
        prepared = [self._select(batch, i) for i in range(len(batch.requests))]  # 4. select
        mark("send")
        if self.handoff is None:
            await self._send(prepared)  # 5. send
        else:
            await self._hand_over(prepared, batch.events)  # 5. hand over in process

    async def _parse(
        self, events: Sequence[faust.EventT[bytes]]
    ) -> list[tuple[RequestRecord, Coordinates, faust.EventT[bytes]]]:
        """1. The valid requests with their coordinates; every bad one is rejected (and awaited)."""
        valid: list[tuple[RequestRecord, Coordinates, faust.EventT[bytes]]] = []
        for event in events:
            coords = Coordinates.of(event)
            try:
                valid.append((await self._parse_one(event.value), coords, event))
            except BadInput as exc:
                await self.rejecter.reject(coords, event.value, exc)
        return valid

    async def _parse_one(self, raw: bytes) -> RequestRecord:
        request = parse_request(raw, default_reply_topic=self.default_reply, limits=self.res.settings.limits)
        mark("parse", request.request_id)
        if request.reply_topic != self.default_reply and not await self.res.topic_directory.exists(
            request.reply_topic
        ):
            raise UnknownReplyTopic(
                f"reply topic {request.reply_topic!r} does not exist; create it before sending "
                f"(EchoClient does this for private reply topics) or omit reply_topic"
            )
        return request

    async def _embed(self, batch: _Batch) -> None:
        """2. One embedding call for the batch; a missing or failing embedder bypasses selection."""
        mark("embed", *(r.request_id for r in batch.requests))
        t = time.perf_counter()
        embedder = self.res.embedder
        if embedder is None:
            batch.bypass = "embedder_unavailable"
        else:
            try:
                batch.vectors = await embedder.embed([r.prompt for r in batch.requests])
            except Exception:
                log.exception(
                    "embedding failed for a batch of %d; serving without examples", len(batch.requests)
                )
                batch.bypass = "embedder_failed"
        batch.seconds["embed"] = time.perf_counter() - t

    async def _retrieve(self, batch: _Batch) -> None:
        """3. Candidates per request: ``search_batch``, one search per tenant, all in flight at once
        (one call for a one-tenant batch; no query ever spans tenants)."""
        mark("retrieve", *(r.request_id for r in batch.requests))
        t = time.perf_counter()
        batch.hits = [[] for _ in batch.requests]
        store = self.res.store
        if batch.vectors is not None and store is None:
            batch.bypass = "store_unavailable"
        elif batch.vectors is not None and store is not None:
            try:
                # stale_ok: a request need not wait for this worker's own latest admissions (a Session
                # read would wait for their time tick); retractions are still honoured (infra/milvus.py)
                batch.hits = await store.search_batch(
                    [r.tenant for r in batch.requests],
                    batch.vectors,
                    limit=self.res.settings.selection.top_k,
                    stale_ok=True,
                )
            except DependencyUnavailable:
                log.warning("vector store unavailable; serving this batch without examples", exc_info=True)
                batch.bypass = "store_failed"
        batch.seconds["retrieve"] = time.perf_counter() - t

    def _select(self, batch: _Batch, i: int) -> PreparedRecord:
        """4. Request ``i``'s examples (pure selection), its routing context and its record."""
        t = time.perf_counter()
        settings, request, vector = self.res.settings, batch.requests[i], batch.vector(i)
        mark("select", request.request_id)
        selected: list[Selected] = []
        if vector is not None and batch.hits[i]:
            selected = list(
                select_examples(
                    vector,
                    request.prompt,
                    batch.hits[i],
                    scorer=self.state.utility,
                    threshold=self.state.tuner.threshold,
                    max_examples=settings.selection.max_examples,
                    min_similarity=settings.selection.min_similarity,
                    duplicate_similarity=settings.selection.duplicate_similarity,
                    diversity=settings.selection.diversity,
                    token_budget=self.state.token_budget,
                    target_tier="small",
                    now=batch.now,
                    large_tier=settings.tgi.large_tier,
                    tenant=request.tenant,
                ).selected
            )
        query = vector if vector is not None else np.zeros(settings.milvus.dimension, dtype=np.float32)
        context = context_features(query, selected, prompt_text=request.prompt)
        seconds = {**batch.seconds, "select": time.perf_counter() - t}
        self._count(vector is not None, len(selected), batch.bypass, seconds)
        coords = batch.coordinates[i]
        return PreparedRecord(
            request=request,
            embedding=encode_vector(vector) if vector is not None else "",
            examples=_example_refs(selected),
            selection_bypassed=batch.bypass,
            timings_ms={k: _ms(v) for k, v in seconds.items()},
            source_partition=coords.partition,
            source_offset=coords.offset,
            context=[float(x) for x in context],
        )

    def _count(self, searched: bool, n_examples: int, bypass: str, seconds: dict[str, float]) -> None:
        metrics = self.res.metrics
        if searched:
            metrics.cache_lookups.inc()
            if n_examples:
                metrics.cache_hits.inc()
        if bypass:
            metrics.bypass.labels(bypass).inc()
        metrics.examples_selected.observe(n_examples)
        for stage, value in seconds.items():
            metrics.observe_stage(stage, value)

    async def _hand_over(
        self, prepared: Sequence[PreparedRecord], events: Sequence[faust.EventT[bytes]]
    ) -> None:
        """5 (``worker.prepared_hop = "inline"``). Serve each record in this process, at most
        ``worker.concurrency`` at once, without waiting for the batch: the next batch is embedded while
        this one generates, as with the topic. Reply-then-commit still holds: each event's message gets
        one more reference here, so ``take_events``' ack leaves it uncommitted; the serve task acks it
        after the reply and the log record are delivered. A serve that raises is answered and
        dead-lettered by the guard, as in serve; only a failure of the guard itself (the dead letter
        could not be sent) leaves the offset uncommitted and re-raises from the next batch (the
        agent's supervisor restarts it). The wait for a free slot is the ``handoff`` stage."""
        for record, event in zip(prepared, events, strict=True):
            queued = time.perf_counter()
            await self._slots.acquire()
            record.timings_ms["handoff"] = _ms(time.perf_counter() - queued)
            self.res.metrics.observe_stage("handoff", time.perf_counter() - queued)
            event.message.incref()
            self.res.inflight += 1
            task = asyncio.create_task(self._serve_inline(record, event))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve_inline(self, record: PreparedRecord, event: faust.EventT[bytes]) -> None:
        assert self.handoff is not None
        handoff = self.handoff
        request = record.request
        try:
            await self.guard.run(
                handoff,
                record,
                coords=Coordinates.of(event),
                address=ReplyAddress(request.request_id, request.tenant, request.reply_topic),
            )
            event.ack()
        except Exception as exc:
            log.exception(
                "in-process serve failed for request %s; its offset stays uncommitted",
                record.request.request_id,
            )
            self._failed = exc
        finally:
            self._slots.release()
            self.res.inflight -= 1

    async def _send(self, prepared: Sequence[PreparedRecord]) -> None:
        """5. Send every record (stamped ``sent_at`` for serve's ``kafka_hop``), then await every delivery."""
        futures = []
        for record in prepared:
            record.timings_ms["sent_at"] = time.time() * 1000.0
            futures.append(await self.topics.prepared.send(key=record.request.request_id, value=record))
        for fut in futures:
            await fut


def register_prepare(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    """With ``worker.prepared_hop = "inline"`` prepared records never cross the prepared topic: a
    ``Server`` in this process serves them (the serve agent stays registered for records already on
    the topic). ``"kafka"`` keeps the topic, for deployments where the two stages scale apart."""
    handoff = None
    if res.settings.worker.prepared_hop == "inline":
        from .serve import Server

        handoff = Server(app, topics, res, state).handle
    preparer = Preparer(app, topics, res, state, handoff=handoff)
    gate = AckGate(lambda: app.consumer)
    emb = res.settings.embedding

    @app.agent(topics.requests, name="echolm.prepare")
    async def prepare(stream: faust.StreamT[bytes]) -> None:
        await res.ready.wait()
        # ``take_events`` is on faust.Stream (what agents receive) but missing from faust.StreamT
        batches = cast("faust.Stream[bytes]", stream).take_events(
            emb.batch_size, within=max(emb.batch_window_s, 0.001)
        )
        async for events in batches:
            for event in events:
                gate.hold(event)
            if res.draining:  # SIGTERM: not taken; un-acked, for the worker that takes over
                continue
            res.inflight += len(events)
            try:
                await preparer.guard.run_batch(
                    preparer.handle_batch, events, lambda e: preparer.rejecter.address_of(e.message.value)
                )
                for event in events:
                    gate.release(event)  # not reached when cancelled: the offsets stay uncommitted
            finally:
                res.inflight -= len(events)
