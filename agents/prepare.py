"""Stage 1 agent, ``prepare``: parse -> embed -> retrieve -> select, in batches.

Why batches: the embedding model is the only CPU-heavy step of the control plane and is about 3x
cheaper per sentence at batch 16 than at batch 1 (docs/architecture.md). ``stream.take_events``
collects up to ``embedding.batch_size`` requests or waits ``embedding.batch_window_s``.

Error policy:
    * ``BadInput`` (decode, schema, limits, tenant, reply topic) -> error reply + dead letter, go on.
    * embedder or Milvus unavailable -> the request goes on with no examples (``selection_bypassed``
      says why, ``echolm_selection_bypass_total`` counts it); it is never dropped.
    * anything else raises: faust's supervisor restarts the agent and the batch is re-read
      (its offsets were not committed).

Ordering (reply-then-commit), per batch:
    1. parse every record; reject bad ones (each rejection awaited to the broker),
    2. embed, retrieve and select for the valid ones,
    3. send one PreparedRecord per request and await every delivery,
    4. return to ``take_events``, which acks the batch's events so their offsets become committable.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import cast

import faust
import numpy as np

from agents.policy.retrieval import select_examples
from infra.errors import BadInput, DependencyUnavailable, UnknownReplyTopic
from infra.protocols import SearchHit
from infra.resources import Resources
from streams.codecs import encode_vector
from streams.records import ExampleRef, PreparedRecord, RequestRecord, parse_request
from streams.topology import Topics

from .reject import Coordinates, Rejecter
from .state import DecisionState

__all__ = ["register_prepare"]

log = logging.getLogger(__name__)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Preparer:
    def __init__(self, app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
        self.app, self.topics, self.res, self.state = app, topics, res, state
        self.rejecter = Rejecter(app, topics, res)
        self.default_reply = res.settings.topic("replies")

    async def handle_batch(self, events: Sequence[faust.EventT[bytes]]) -> None:
        settings, metrics = self.res.settings, self.res.metrics
        # 1. parse
        t0 = time.perf_counter()
        valid: list[tuple[RequestRecord, Coordinates]] = []
        for event in events:
            coords = Coordinates.of(event)
            try:
                request = parse_request(
                    event.value, default_reply_topic=self.default_reply, limits=settings.limits
                )
                if request.reply_topic != self.default_reply and not await self.res.topic_directory.exists(
                    request.reply_topic
                ):
                    raise UnknownReplyTopic(
                        f"reply topic {request.reply_topic!r} does not exist; create it before sending "
                        f"(EchoClient does this for private reply topics) or omit reply_topic"
                    )
                valid.append((request, coords))
            except BadInput as exc:
                await self.rejecter.reject(coords, event.value, exc)
        if not valid:
            return
        parse_s = (time.perf_counter() - t0) / max(1, len(events))
        requests = [r for r, _ in valid]

        # 2. embed
        bypass = ""
        vectors: np.ndarray | None = None
        t1 = time.perf_counter()
        embedder = self.res.embedder
        if embedder is None:
            bypass = "embedder_unavailable"
        else:
            try:
                vectors = await embedder.embed([r.prompt for r in requests])
            except Exception:
                log.exception("embedding failed for a batch of %d; serving without examples", len(requests))
                bypass = "embedder_failed"
        embed_s = time.perf_counter() - t1

        # 3. retrieve, per tenant (the store filters by tenant; no query ever spans tenants)
        t2 = time.perf_counter()
        hits: list[list[SearchHit]] = [[] for _ in requests]
        store = self.res.store
        if vectors is not None and store is None:
            bypass = "store_unavailable"
        elif vectors is not None and store is not None:
            by_tenant: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(requests):
                by_tenant[r.tenant].append(i)
            try:
                for tenant, rows in by_tenant.items():
                    found = await store.search(tenant, vectors[rows], limit=settings.selection.top_k)
                    for row, row_hits in zip(rows, found, strict=True):
                        hits[row] = row_hits
            except DependencyUnavailable:
                log.warning("vector store unavailable; serving this batch without examples", exc_info=True)
                bypass = "store_failed"
        retrieve_s = time.perf_counter() - t2

        # 4. select (pure), then send
        now = time.time()
        futures = []
        for i, (request, coords) in enumerate(valid):
            t3 = time.perf_counter()
            examples: list[ExampleRef] = []
            if vectors is not None and hits[i]:
                result = select_examples(
                    vectors[i],
                    request.prompt,
                    hits[i],
                    scorer=self.state.utility,
                    threshold=self.state.tuner.threshold,
                    max_examples=settings.selection.max_examples,
                    min_similarity=settings.selection.min_similarity,
                    duplicate_similarity=settings.selection.duplicate_similarity,
                    diversity=settings.selection.diversity,
                    token_budget=self.state.token_budget,
                    target_tier="small",
                    now=now,
                    large_tier=settings.tgi.large_tier,
                    tenant=request.tenant,
                )
                examples = [
                    ExampleRef(
                        example_id=s.example.example_id,
                        request=s.example.request,
                        response=s.example.response,
                        similarity=float(s.similarity),
                        utility=float(s.utility),
                        model_tier=s.example.model_tier,
                    )
                    for s in result.selected
                ]
            select_s = time.perf_counter() - t3
            if vectors is not None:
                metrics.cache_lookups.inc()
                if examples:
                    metrics.cache_hits.inc()
            if bypass:
                metrics.bypass.labels(bypass).inc()
            metrics.examples_selected.observe(len(examples))
            for stage, seconds in (
                ("parse", parse_s),
                ("embed", embed_s),
                ("retrieve", retrieve_s),
                ("select", select_s),
            ):
                metrics.observe_stage(stage, seconds)
            prepared = PreparedRecord(
                request=request,
                embedding=encode_vector(vectors[i]) if vectors is not None else "",
                examples=examples,
                selection_bypassed=bypass,
                timings_ms={
                    "parse": _ms(parse_s),
                    "embed": _ms(embed_s),
                    "retrieve": _ms(retrieve_s),
                    "select": _ms(select_s),
                    "sent_at": time.time() * 1000.0,
                },
                source_partition=coords.partition,
                source_offset=coords.offset,
            )
            futures.append(await self.topics.prepared.send(key=request.request_id, value=prepared))
        for fut in futures:
            await fut


def register_prepare(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    preparer = Preparer(app, topics, res, state)
    emb = res.settings.embedding

    @app.agent(topics.requests, name="echolm.prepare")
    async def prepare(stream: faust.StreamT[bytes]) -> None:
        await res.ready.wait()
        # ``take_events`` is on faust.Stream (what agents receive) but missing from faust.StreamT
        batches = cast("faust.Stream[bytes]", stream).take_events(
            emb.batch_size, within=max(emb.batch_window_s, 0.001)
        )
        async for events in batches:
            res.inflight += len(events)
            try:
                await preparer.handle_batch(events)
            finally:
                res.inflight -= len(events)
