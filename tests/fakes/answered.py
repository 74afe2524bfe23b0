"""``FakeAnsweredFeed``: the answered topic without a broker, for unit tests of serve's idempotency.

``publish`` puts an answer on the fake topic (as another worker's write would); ``catch_up`` hands
every published answer to the sinks that have not seen it yet, as the Kafka feed does once it has
read to the end offsets. ``catch_ups`` counts the barrier's uses.
"""

from __future__ import annotations

import time

from infra.protocols import AnsweredSink

__all__ = ["FakeAnsweredFeed"]


class FakeAnsweredFeed:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, float]] = []
        self._sinks: list[tuple[AnsweredSink, list[int]]] = []
        self.catch_ups = 0
        self.closed = False

    def subscribe(self, sink: AnsweredSink) -> None:
        self._sinks.append((sink, [0]))

    def publish(self, request_id: str, value: bytes, answered_at: float | None = None) -> None:
        self.published.append((request_id, value, time.time() if answered_at is None else answered_at))

    async def catch_up(self) -> None:
        self.catch_ups += 1
        for sink, seen in self._sinks:
            for request_id, value, at in self.published[seen[0] :]:
                sink(request_id, value, at)
            seen[0] = len(self.published)

    async def aclose(self) -> None:
        self.closed = True
