"""``KafkaAnsweredFeed``: every answer on ``<prefix>.answered``, read by every serving worker.

One aiokafka consumer without a group reads every partition of the answered topic from the
beginning and keeps reading, handing each record (key = request id, value bytes, timestamp) to the
subscribed sinks (``agents.idempotency.IdempotencyGuard`` fills its bounded map). It starts on the
first ``catch_up`` (so workers that never serve never open it).

``catch_up`` is the barrier ``serve`` needs before it trusts a miss: it asks the broker for the
end offsets now, then waits until the consumer's position has reached them on every partition.
Everything written before the call has then been handed to the sinks. (On Tansu, end offsets are
right only with one record per producer batch, the local default ``kafka.producer_max_batch_size=1``:
docs/local-stack.md. With ``kafka.processing_guarantee=exactly_once`` the consumer reads
``read_committed``, so end offsets are the last stable offsets and aborted answers are never seen.)

Why not a faust Table with a changelog: every worker would hold only the partitions it owns and
would have to recover a changelog at each rebalance before serving (faust's recovery checks end
offsets, which Tansu gets wrong after multi-record batches, and is slow to start on it): the same
barrier with more machinery. A plain consumer of one small compacted topic is what ``ModelSync``
already does for model updates.

Error policy: the consumer reconnects by itself through broker outages (aiokafka); a record without
a key or value is skipped (a tombstone: nothing to remember); the reader task's own crash is logged
and it restarts after a second, and ``catch_up`` keeps waiting (its caller bounds the wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from .kafka import kafka_consumer_kwargs
from .protocols import AnsweredSink
from .settings import Settings

__all__ = ["KafkaAnsweredFeed"]

log = logging.getLogger(__name__)


class KafkaAnsweredFeed:
    def __init__(self, settings: Settings, topic: str | None = None) -> None:
        self.settings = settings
        self.topic = topic or settings.topic("answered")
        self._sinks: list[AnsweredSink] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._advanced = asyncio.Event()
        self._assigned = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.records = 0  # records handed to the sinks since start

    def subscribe(self, sink: AnsweredSink) -> None:
        self._sinks.append(sink)

    async def catch_up(self) -> None:
        if self._closed:
            raise RuntimeError(f"the answered feed of {self.topic} is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="echolm-answered-feed")
        await self._assigned.wait()
        consumer = self._consumer
        assert consumer is not None
        ends = await consumer.end_offsets(self._partitions)
        while any(self._positions.get(tp, 0) < end for tp, end in ends.items()):
            self._advanced.clear()
            await self._advanced.wait()

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except KafkaError:
                log.exception("answered feed of %s failed; restarting it in 1 s", self.topic)
                await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(**self._consumer_kwargs())
        await consumer.start()
        try:
            partitions = await self._topic_partitions(consumer)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            self._consumer, self._partitions = consumer, partitions
            self._positions = {tp: await consumer.position(tp) for tp in partitions}
            self._assigned.set()
            self._advanced.set()
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for messages in batch.values():
                    for message in messages:
                        self._hand_over(message.key, message.value, message.timestamp)
                for tp in partitions:
                    self._positions[tp] = await consumer.position(tp)
                self._advanced.set()
        finally:
            self._assigned.clear()
            self._consumer = None
            await consumer.stop()

    def _consumer_kwargs(self) -> dict[str, Any]:
        kw = kafka_consumer_kwargs(self.settings, background=True)
        return {**kw, "group_id": None, "enable_auto_commit": False, "auto_offset_reset": "earliest"}

    async def _topic_partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        """The topic's partitions; waits (logging every 10 s) while the topic does not exist yet."""
        waited_since = time.monotonic()
        warned_at = 0.0
        while True:
            await consumer.topics()  # refreshes the metadata
            found = consumer.partitions_for_topic(self.topic)
            if found:
                return [TopicPartition(self.topic, p) for p in sorted(found)]
            waited = time.monotonic() - waited_since
            if waited - warned_at >= 10.0 or warned_at == 0.0:
                warned_at = max(waited, 1e-9)
                log.warning(
                    "topic %s does not exist (%.0f s): answered requests cannot be recognised until it "
                    "does; create it with `echolm topics create`",
                    self.topic,
                    waited,
                )
            await asyncio.sleep(1.0)

    def _hand_over(self, key: bytes | None, value: bytes | None, timestamp_ms: int) -> None:
        if not key or not value:
            return
        request_id = key.decode("utf-8", errors="replace")
        answered_at = timestamp_ms / 1000.0 if timestamp_ms and timestamp_ms > 0 else time.time()
        self.records += 1
        for sink in self._sinks:
            sink(request_id, value, answered_at)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
