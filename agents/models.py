"""Keep every worker's learned state identical: the model-update stream.

The ``learn`` agent turns each joined feedback into a ``ModelUpdateRecord`` on the single-partition
``model-updates`` topic instead of changing its own models. ``ModelSync`` (a service in every worker,
whatever its role) reads that topic from its checkpoint, without a consumer group, and applies each
update in order: a LinUCB update (A += x x^T, b += r x) to the router's bandit, a training row for the
utility model, an observation for the threshold tuner. All workers therefore hold the same bandit, and
a worker that restarts resumes from the offset saved with its checkpoint (``routing.state_path``).

Error policy: a record that does not decode is logged and skipped (it is a model update, not a
request); a broker outage pauses the loop, which reconnects by itself; apply errors raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import faust
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from infra.kafka import kafka_consumer_kwargs
from infra.resources import Resources
from streams.records import ModelUpdateRecord
from streams.topology import Topics

from .state import DecisionState

__all__ = ["ModelSync", "apply_update", "register_model_sync"]

log = logging.getLogger(__name__)


def apply_update(state: DecisionState, update: ModelUpdateRecord) -> None:
    if not state.claim_rating(update.request_id, update.rater):  # a redelivered rating: applied once
        return
    context = np.asarray(update.context, dtype=np.float64)
    if update.tier in state.bandit.tiers and context.size:
        state.bandit.update(update.tier, context, update.reward)
    for features, utility in zip(update.example_features, update.utilities, strict=False):
        state.add_training(np.asarray(features, dtype=np.float64), update.reward)
        state.tuner.observe(utility, update.reward >= 0.5)
    state.updates_since_save += 1


class ModelSync(Service):
    def __init__(self, topic: str, res: Resources, state: DecisionState, **kwargs: Any) -> None:
        self.topic, self.res, self.decisions = topic, res, state
        self.applied = 0
        self._task: asyncio.Task[None] | None = None
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="echolm-model-sync")

    async def on_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(
            **kafka_consumer_kwargs(self.res.settings, background=True),
            group_id=None,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            start = self.decisions.applied_offset + 1
            if 0 < start <= end:
                consumer.seek(tp, start)
            else:  # no checkpoint, or the topic is younger than it (a fresh broker): replay it all
                self.decisions.applied_offset = -1
                await consumer.seek_to_beginning(tp)
            async for message in consumer:
                try:
                    update = ModelUpdateRecord.loads(message.value)
                except (ValueError, TypeError, KeyError):
                    log.warning("skipping undecodable model update at offset %d", message.offset)
                    continue
                apply_update(self.decisions, update)
                self.decisions.applied_offset = message.offset
                self.applied += 1
        finally:
            await consumer.stop()


def register_model_sync(app: faust.App, topics: Topics, res: Resources, state: DecisionState) -> None:
    # faust annotates ``service`` for a class, but also starts an instance (App._prepare_subservice)
    app.service(ModelSync(topics.model_updates.get_topic_name(), res, state))  # type: ignore[arg-type]

    @app.timer(5.0, name="echolm.model-checkpoint")  # type: ignore[untyped-decorator]
    async def checkpoint() -> None:
        if state.updates_since_save == 0:
            return
        try:  # a faust timer that raises crashes the worker; the next tick saves again
            state.tuner.tune()
            if state.retrain_utility():
                log.info("utility model retrained on %d rows", len(state.training_y))
            state.save()
        except Exception:
            log.exception("model checkpoint failed; routing goes on with the models in memory")
