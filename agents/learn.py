"""Background agents, ``learn``: join feedback to logged decisions and update the models.

* ``echolm.learn-log`` remembers each served request's decision (tier, bandit context, the
  examples used) in a bounded in-memory map; the log and feedback topics are both keyed by tenant
  and have the same partition count, so faust assigns a tenant's log and feedback partitions to the
  same worker (co-partitioning) and the join is local.
* ``echolm.learn-feedback`` looks the decision up and publishes a ``ModelUpdateRecord`` (tier,
  bandit context, reward, example features) to ``model-updates``, which every worker applies
  (agents/models.py), so all workers route with the same learned bandit.

A rating whose (request id, rater) this worker has already applied is counted as ``duplicate`` and
not published again; the guarantee itself is enforced where updates are applied (``state.claim_rating``,
checkpointed), so a duplicate published before the first came back is skipped there.

Feedback for a request this worker never saw (older than the map, or before a restart) is
counted as ``unjoined`` and dropped; it carries no decision to learn from.

Error policy: each record is handled under the guard (agents/guard.py): a record whose handling
raises is dead-lettered with stage ``learn`` (no reply: feedback has no reply address) and the agent
goes on; offsets are acked in order once handled or dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import numpy as np

from agents.policy.retrieval import candidate_features
from infra.errors import Unauthorized
from infra.protocols import SearchHit
from infra.resources import Resources
from infra.settings import LimitsSettings
from streams.records import FeedbackRecord, LogRecord, ModelUpdateRecord, ReplyAddress, authenticate
from streams.topology import Topics

from .guard import AckGate, Guard, mark
from .reject import Coordinates, Rejecter
from .state import DecisionState, RecentDecision

__all__ = ["register_learn"]

log = logging.getLogger(__name__)
_JOIN_WAIT_STEPS = 20  # up to 2 s for a request's log record to arrive after its feedback


def decision_from_log(record: LogRecord, dim: int, large_tier: str) -> RecentDecision | None:
    if record.route is None or not record.reply.ok:
        return None
    # refs carry their similarity, so no cosine is computed: the query embedding is not needed
    empty = np.zeros(dim, dtype=np.float32)
    now = record.logged_at or time.time()
    features = tuple(
        candidate_features(
            empty,
            record.request.prompt,
            SearchHit(example=ref.example(record.request.tenant, empty), similarity=ref.similarity),
            target_tier=record.route.tier,
            now=now,
            large_tier=large_tier,
        )
        for ref in record.examples
    )
    return RecentDecision(
        tier=record.route.tier,
        context=np.asarray(record.route.context, dtype=np.float64),
        example_ids=tuple(ref.example_id for ref in record.examples),
        example_features=features,
        utilities=tuple(ref.utility for ref in record.examples),
        tenant=record.request.tenant,
    )


async def _await_decision(state: DecisionState, request_id: str) -> RecentDecision | None:
    decision = state.recent.get(request_id)
    for _ in range(_JOIN_WAIT_STEPS):  # the log record may trail the feedback by a moment
        if decision is not None:
            break
        await asyncio.sleep(0.1)
        decision = state.recent.get(request_id)
    return decision


def feedback_refusal(
    fb: FeedbackRecord, decision_tenant: str | None, limits: LimitsSettings
) -> Unauthorized | None:
    """Why a feedback record is refused, or None. With signed tenants (``limits.tenant_secrets``) it
    must be signed by its tenant's secret; and it must come from the tenant of the request it rates
    (``decision_tenant``; None = not joined yet, "" = a decision logged before tenants were kept)."""
    try:
        authenticate({**fb.signed_fields(), "signature": fb.signature}, fb.tenant, limits)
    except Unauthorized as exc:
        return exc
    if decision_tenant and decision_tenant != fb.tenant:
        return Unauthorized(
            f"feedback from tenant {fb.tenant!r} rates a request of another tenant; only its own tenant may"
        )
    return None


async def _joined(fb: FeedbackRecord, state: DecisionState, rejecter: Rejecter) -> RecentDecision | None:
    """The decision ``fb`` rates, or None: refused feedback is dead-lettered (no error reply: it could
    reach the rated request's own client), unjoined feedback counted."""
    res = rejecter.res
    refusal = feedback_refusal(fb, None, res.settings.limits)
    decision = None if refusal is not None else await _await_decision(state, fb.request_id)
    if decision is None and refusal is None:
        res.metrics.feedback.labels("unjoined").inc()
        return None
    if refusal is None and decision is not None:
        refusal = feedback_refusal(fb, decision.tenant, res.settings.limits)
    if refusal is not None:
        res.metrics.feedback.labels("refused").inc()
        event = faust.current_event()
        topic = res.settings.topic("feedback")
        coords = Coordinates.of(event) if event is not None else Coordinates(topic, -1, -1, fb.tenant)
        await rejecter.reject(coords, fb.dumps(), refusal, reply=False)
        return None
    return decision


def _model_update(fb: FeedbackRecord, decision: RecentDecision, worker: str) -> ModelUpdateRecord:
    reward = float(min(1.0, max(0.0, fb.score)))
    return ModelUpdateRecord(
        request_id=fb.request_id,
        tier=decision.tier,
        context=[float(v) for v in decision.context],
        reward=reward,
        example_features=[[float(v) for v in f] for f in decision.example_features],
        utilities=list(decision.utilities),
        worker=worker,
        at=time.time(),
        rater=fb.rater,
    )


class _Learner:
    """The two handlers, one record each (run under the guard by ``register_learn``)."""

    def __init__(self, topics: Topics, res: Resources, state: DecisionState, rejecter: Rejecter) -> None:
        self.topics, self.res, self.state, self.rejecter = topics, res, state, rejecter

    async def remember(self, record: LogRecord) -> None:
        mark("learn")
        if record.origin != "serve":
            return
        decision = decision_from_log(
            record, self.res.settings.milvus.dimension, self.res.settings.tgi.large_tier
        )
        if decision is not None:
            self.state.remember(record.request.request_id, decision)

    async def join(self, fb: FeedbackRecord) -> None:
        mark("learn", fb.request_id)
        metrics = self.res.metrics
        if self.state.has_rating(fb.request_id, fb.rater):
            metrics.feedback.labels("duplicate").inc()
            return
        decision = await _joined(fb, self.state, self.rejecter)  # refused or unjoined: None, counted
        if decision is None:
            return
        update = _model_update(fb, decision, self.res.worker_id)
        fut = await self.topics.model_updates.send(key=fb.tenant, value=update)
        await fut
        metrics.feedback.labels("joined").inc()


def register_learn(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    rejecter = Rejecter(app, topics, res)
    learner = _Learner(topics, res, state, rejecter)
    guard = Guard(res, rejecter)
    log_gate, feedback_gate = AckGate(lambda: app.consumer), AckGate(lambda: app.consumer)

    @app.agent(topics.log, name="echolm.learn-log")
    async def learn_log(stream: faust.StreamT[LogRecord]) -> None:
        async for event in stream.events():
            log_gate.hold(event)
            record: LogRecord = event.value
            request = record.request
            await guard.run(
                learner.remember,
                record,
                coords=Coordinates.of(event),
                address=ReplyAddress(request.request_id, request.tenant, request.reply_topic),
                reply=False,  # its request was answered already
            )
            log_gate.release(event)

    @app.agent(topics.feedback, name="echolm.learn-feedback")
    async def learn_feedback(stream: faust.StreamT[FeedbackRecord]) -> None:
        async for event in stream.events():
            feedback_gate.hold(event)
            fb: FeedbackRecord = event.value
            await guard.run(
                learner.join,
                fb,
                coords=Coordinates.of(event),
                address=ReplyAddress(fb.request_id, fb.tenant, ""),
                raw=event.message.value,
                reply=False,  # feedback has no reply address
            )
            feedback_gate.release(event)
