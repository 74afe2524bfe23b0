"""Background agent, ``admit``: the single writer that turns the log into the example bank.

The bank in Milvus is a *view of the log topic*: every change to it (a large-tier answer admitted,
a replayed answer that scored better, an imported pair, offload credit for examples that helped a
small model) is derived here from ``LogRecord``s, so ``echolm rebuild-cache`` can rebuild it by
replaying the same records through ``apply_log_records``.

Merge rules per example id (``sha256(tenant, normalised request)``):
    * origin ``serve``: insert when absent; an existing entry keeps its answer and statistics;
    * origin ``replay``: replace the answer and quality, bump ``replay_rounds``, keep statistics;
    * origin ``import``: overwrite (an operator's warm start is authoritative);
    * every served request that selected an example updates the example's replay gain G(e) (an EMA
      of (1 - quality) x normalised large-tier cost: in demand but weak answers are worth replaying)
      and queues it for replay; small-tier replies that used it also credit it one offload (its
      eviction value).

Error policy: Milvus unavailable -> wait and retry the same batch (the log is durable and the offsets
are not committed until the batch is applied); nothing is skipped. Anything else a batch raises ->
its records are applied one by one under the guard (agents/guard.py): the one that fails is
dead-lettered with stage ``admit`` (no reply: its request was answered already), the rest applied,
and the agent goes on. Offsets are acked in order, after their record was applied or dead-lettered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import faust

from agents.policy.admission import decide_admission, example_id, scrub_pii
from agents.policy.replay import credit_offload, update_gain
from infra.errors import DependencyUnavailable
from infra.protocols import Example, VectorStore
from infra.resources import Resources
from infra.settings import Settings
from streams.codecs import decode_vector
from streams.records import LogRecord, ReplyAddress
from streams.topology import Topics

from .guard import AckGate, Guard, mark
from .reject import Rejecter
from .state import DecisionState

__all__ = ["apply_log_records", "example_from_log", "register_admit"]

log = logging.getLogger(__name__)


def example_from_log(record: LogRecord, *, now: float) -> Example:
    request = record.request
    quality = record.quality if record.quality >= 0 else 0.5
    return Example(
        example_id=example_id(request.tenant, request.prompt),
        tenant=request.tenant,
        request=scrub_pii(request.prompt),
        response=scrub_pii(record.reply.text),
        embedding=decode_vector(record.embedding),
        model_tier=record.reply.tier,
        quality=quality,
        replay_rounds=record.replay_rounds,
        created_at=now,
        updated_at=now,
    )


Key = tuple[str, str]  # (tenant, example id)


@dataclass
class _Batch:
    """What one batch of log records asks of the bank, before the store is read."""

    candidates: dict[Key, tuple[LogRecord, Example]] = field(default_factory=dict)
    uses: dict[Key, int] = field(default_factory=dict)  # times selected for a served request (demand)
    credits: dict[Key, int] = field(default_factory=dict)  # times it let a cheaper tier answer (offloads)
    rejected: int = 0


def _tally(records: Sequence[LogRecord], large: str, *, now: float) -> _Batch:
    """Step 1: admission decisions, and the examples each served request used."""
    batch = _Batch()
    for record in records:
        reply = record.reply
        if record.origin == "serve" and reply.ok and record.examples:
            for ref in record.examples:
                key = (record.request.tenant, ref.example_id)
                batch.uses[key] = batch.uses.get(key, 0) + 1
                if reply.tier != large:
                    batch.credits[key] = batch.credits.get(key, 0) + 1
        decision = decide_admission(
            tier=reply.tier,
            large_tier=large,
            no_store=record.request.no_store,
            ok=reply.ok,
            text=reply.text,
            prompt=record.request.prompt,
        )
        if not decision.admit or not record.embedding:
            batch.rejected += 1
            continue
        ex = example_from_log(record, now=now)
        batch.candidates[(ex.tenant, ex.example_id)] = (record, ex)
    return batch


async def _existing(store: VectorStore, keys: set[Key]) -> dict[Key, Example]:
    """Step 2: the bank's current entries for every key the batch touches, one read per tenant."""
    by_tenant: dict[str, list[str]] = {}
    for tenant, eid in keys:
        by_tenant.setdefault(tenant, []).append(eid)
    existing: dict[Key, Example] = {}
    for tenant, ids in by_tenant.items():
        for ex in await store.get(tenant, ids):
            existing[(tenant, ex.example_id)] = ex
    return existing


def _merge(
    batch: _Batch, existing: Mapping[Key, Example], counts: dict[str, int], *, now: float
) -> dict[Key, Example]:
    """Step 3: the merge rules of the module docstring, for the admitted candidates."""
    writes: dict[Key, Example] = {}
    for key, (record, ex) in batch.candidates.items():
        old = existing.get(key)
        if record.origin == "import" or old is None:
            writes[key] = ex
            counts["imported" if record.origin == "import" else "admitted"] += 1
        elif record.origin == "replay":
            writes[key] = replace(
                old,
                response=ex.response,
                quality=ex.quality,
                replay_rounds=max(old.replay_rounds, ex.replay_rounds),
                updated_at=now,
            )
            counts["replaced"] += 1
    return writes


def _credit(
    batch: _Batch,
    writes: dict[Key, Example],
    existing: Mapping[Key, Example],
    settings: Settings,
    counts: dict[str, int],
    *,
    now: float,
    state: DecisionState | None,
) -> None:
    """Step 4: offload credit and replay gain for every example a served request used."""
    large = settings.tgi.large_tier
    max_cost = max(b.cost for b in settings.tgi.backends)
    cost = {b.tier: b.cost for b in settings.tgi.backends}.get(large, max_cost)
    for key, n in batch.uses.items():
        base = writes.get(key) or existing.get(key)
        if base is None:
            continue  # evicted since it was selected
        for _ in range(batch.credits.get(key, 0)):
            base = credit_offload(
                base, success=True, now=now, decay_per_hour=settings.replay.value_decay_per_hour
            )
        gain = base.gain
        for _ in range(n):
            gain = update_gain(
                gain, quality=base.quality, cost=cost, max_cost=max_cost, ema=settings.replay.gain_ema
            )
        writes[key] = replace(base, gain=gain)
        counts["credited"] += 1
        if state is not None:
            state.replay_queue.push(key[0], key[1], gain)


async def apply_log_records(
    records: Sequence[LogRecord],
    store: VectorStore,
    settings: Settings,
    *,
    now: float,
    state: DecisionState | None = None,
) -> dict[str, int]:
    """Apply a batch of log records to the store. Returns counts by what happened.

    Steps: (1) tally admissions and uses, (2) read the entries they touch, (3) merge, (4) credit
    offloads and update replay gains, (5) write everything that changed in one upsert.
    """
    batch = _tally(records, settings.tgi.large_tier, now=now)
    counts = {"admitted": 0, "replaced": 0, "imported": 0, "credited": 0, "rejected": batch.rejected}
    existing = await _existing(store, set(batch.candidates) | set(batch.uses))
    writes = _merge(batch, existing, counts, now=now)
    _credit(batch, writes, existing, settings, counts, now=now, state=state)
    if writes:
        await store.upsert(list(writes.values()))
    return counts


async def _admit_batch(
    res: Resources, state: DecisionState, events: Sequence[faust.EventT[LogRecord]]
) -> None:
    """Apply one batch of log events; an unavailable store is waited for, the same batch retried."""
    batch = [cast("LogRecord", e.value) for e in events]
    mark("admit", *(r.request.request_id for r in batch))
    while True:
        store = res.store
        if store is not None:
            try:
                counts = await apply_log_records(batch, store, res.settings, now=time.time(), state=state)
                break
            except DependencyUnavailable:
                log.warning("vector store unavailable while admitting; retrying the batch", exc_info=True)
        await asyncio.sleep(1.0)
    for reason in ("admitted", "replaced", "imported"):
        if counts[reason]:
            res.metrics.admitted.labels(reason).inc(counts[reason])


def _address(event: faust.EventT[LogRecord]) -> ReplyAddress:
    request = cast("LogRecord", event.value).request
    return ReplyAddress(request.request_id, request.tenant, request.reply_topic)


def register_admit(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    guard = Guard(res, Rejecter(app, topics, res))
    gate = AckGate(lambda: app.consumer)
    admit_batch = functools.partial(_admit_batch, res, state)

    @app.agent(topics.log, name="echolm.admit")
    async def admit(stream: faust.StreamT[LogRecord]) -> None:
        await res.ready.wait()
        # ``take_events`` is on faust.Stream (what agents receive) but missing from faust.StreamT
        async for events in cast("faust.Stream[LogRecord]", stream).take_events(64, within=0.2):
            for event in events:
                gate.hold(event)
            # the request was answered already: a failure is dead-lettered, never replied to
            await guard.run_batch(admit_batch, events, _address, reply=False)
            for event in events:
                gate.release(event)
