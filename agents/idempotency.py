"""serve's idempotency: an answered request is re-sent, never generated a second time.

``IdempotencyGuard`` is the I/O around ``agents.policy.idempotency`` (the bounded ``AnsweredMap`` and
the ``on_arrival`` decision). It keeps the map current from the answered topic (``res.answered``, an
``infra.protocols.AnsweredFeed``: every partition of ``<prefix>.answered``, read by every serving
worker) and from this worker's own writes.

Ordering, per request (the steps of agents/serve.py):
    0. ``begin``: wait until the map holds every answer written so far (once at start and once after
       each rebalance, at most ``idempotency.sync_timeout_s``), then decide: re-send a stored answer
       (``resend``; no route, no generation, no log record), wait for this worker's own generation of
       the same id, or generate;
    3a. ``record``: the ``AnsweredRecord`` (the reply and its topic) is sent to the answered topic and
       awaited, before 3b the reply and 4 the log record.
A worker that dies after 3a leaves an answer that the next owner of the request finds at step 0: it
re-sends the stored reply (the client may see it twice on the wire; ``EchoClient`` delivers it once)
and generates nothing. One that dies before 3a never sent a reply, so generating again is right.
Error replies are not recorded: a request that failed may succeed when it is delivered again.

The guard is shared by every ``Server`` of one worker (``guard_for``: with
``worker.prepared_hop = "inline"`` prepare has its own), so its map and its in-progress ids are one.

Error policy: a stored answer that does not decode is logged and the request generated; a failed
write to the answered topic raises (the request stays uncommitted and is served again); a catch-up
that does not finish within ``idempotency.sync_timeout_s`` is logged and counted
(``echolm_idempotency_total{result="unsynced"}``) and serving goes on without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

import faust

from infra.protocols import AnsweredFeed
from infra.resources import Resources
from streams.records import AnsweredRecord, ReplyRecord
from streams.topology import Topics

from .policy.idempotency import AnsweredMap, Arrival, on_arrival

__all__ = ["IdempotencyGuard", "guard_for"]

log = logging.getLogger(__name__)

_GUARDS: weakref.WeakKeyDictionary[Resources, IdempotencyGuard] = weakref.WeakKeyDictionary()


def guard_for(app: faust.App, res: Resources) -> IdempotencyGuard:
    """The worker's one guard (created on first use, subscribed to the answered feed and to rebalances)."""
    guard = _GUARDS.get(res)
    if guard is None:
        guard = _GUARDS[res] = IdempotencyGuard(res)
        rebalanced = guard.on_partitions_assigned

        async def on_partitions_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
            await rebalanced(sender)

        # mode's SignalHandlerT does not accept an async receiver's inferred type; faust awaits it
        app.on_partitions_assigned.connect(on_partitions_assigned)  # type: ignore[arg-type]
    return guard


class IdempotencyGuard:
    def __init__(self, res: Resources) -> None:
        s = res.settings.idempotency
        self.res, self.enabled = res, s.enabled
        self.answers = AnsweredMap(max_entries=s.max_entries, max_bytes=s.max_bytes, horizon_s=s.horizon_s)
        self.sync_timeout_s = s.sync_timeout_s
        self._in_progress: dict[str, asyncio.Event] = {}
        self._wanted = 1  # catch-ups asked for (one at start, one per rebalance) ...
        self._synced = 0  # ... and the last one done
        self._sync_lock = asyncio.Lock()
        self._feed: AnsweredFeed | None = None

    # -- keeping the map current -----------------------------------------------------------------
    def _remember(self, request_id: str, value: bytes, answered_at: float) -> None:
        self.answers.put(request_id, value, answered_at, time.time())
        metrics = self.res.metrics
        metrics.answered_entries.set(len(self.answers))
        metrics.answered_bytes.set(self.answers.nbytes)

    async def on_partitions_assigned(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        """faust's rebalance signal: requests of partitions new to this worker may have been answered
        by their previous owner, so catch up before the next decision."""
        self._wanted += 1

    async def _catch_up(self) -> None:
        if self._synced >= self._wanted:
            return
        async with self._sync_lock:
            wanted = self._wanted
            if self._synced >= wanted:
                return
            feed = self.res.answered
            if feed is None:
                raise RuntimeError("serve's idempotency check needs Resources started (no answered feed)")
            if feed is not self._feed:
                feed.subscribe(self._remember)
                self._feed = feed
            started = time.perf_counter()
            try:
                await asyncio.wait_for(feed.catch_up(), timeout=self.sync_timeout_s)
            except TimeoutError:
                self.res.metrics.idempotency.labels("unsynced").inc()
                log.warning(
                    "the answered topic was not read to its end within %.0f s: serving on without "
                    "waiting; a request answered by another worker may be generated again",
                    self.sync_timeout_s,
                )
            else:
                log.info(
                    "answered topic read to its end in %.3f s: %d answers remembered (%d bytes)",
                    time.perf_counter() - started,
                    len(self.answers),
                    self.answers.nbytes,
                )
            self._synced = wanted

    # -- serve's steps 0 and 3a ------------------------------------------------------------------
    async def begin(self, request_id: str) -> AnsweredRecord | None:
        """Step 0: the stored answer to re-send, or None: the caller generates and calls ``end`` after."""
        if not self.enabled:
            return None
        await self._catch_up()
        while True:
            stored = self.answers.get(request_id, time.time())
            action = on_arrival(stored, in_progress=request_id in self._in_progress)
            if action is Arrival.RESEND:
                assert stored is not None
                try:
                    return AnsweredRecord.loads(stored.value)
                except (ValueError, TypeError, KeyError):
                    log.exception("stored answer for %s does not decode; generating it again", request_id)
                    self.answers.discard(request_id)
                    continue
            if action is Arrival.WAIT:
                self.res.metrics.idempotency.labels("waited").inc()
                await self._in_progress[request_id].wait()
                continue
            self._in_progress[request_id] = asyncio.Event()
            return None

    def end(self, request_id: str) -> None:
        """The generation ``begin`` allowed is over (answered, failed or cancelled)."""
        event = self._in_progress.pop(request_id, None)
        if event is not None:
            event.set()

    async def record(self, topics: Topics, reply_topic: str, reply: ReplyRecord) -> None:
        """Step 3a: the answer to the answered topic, awaited, then into this worker's map."""
        if not self.enabled:
            return
        answered = AnsweredRecord(
            request_id=reply.request_id, reply_topic=reply_topic, reply=reply, answered_at=time.time()
        )
        fut = await topics.answered.send(key=reply.request_id, value=answered)
        await fut
        self._remember(reply.request_id, answered.dumps(), answered.answered_at)

    async def resend(self, app: faust.App, topics: Topics, answered: AnsweredRecord) -> None:
        """The stored reply again, to the topic it went to, awaited (the client drops it if it has it)."""
        reply = answered.reply
        topic = topics.reply_topic(app, answered.reply_topic)
        fut = await topic.send(key=reply.request_id, value=reply)
        await fut
        self.res.metrics.idempotency.labels("resent").inc()
        log.info(
            "request %s was answered before (by %s, %.1f s ago): stored reply re-sent, not generated again",
            reply.request_id,
            reply.worker or "?",
            time.time() - answered.answered_at,
        )
