"""``Liveness``: is this worker's event loop turning, and is its Kafka consumer still fetching?

A thread that answers HTTP proves only that the thread is alive. Two timestamps prove more:

* **loop tick**: a faust timer in the worker's event loop stamps ``tick()`` every
  ``worker.liveness_tick_s``. A loop blocked by a synchronous call, or an app that stopped, stops it.
* **consumer poll**: the worker's consumer thread stamps ``polled()`` each time a fetch returns
  (streams/transport.py), with or without records, and counts the records. A fetcher that hangs or
  died stops it, even while the loop ticks.

``report()`` is unhealthy when either age exceeds its limit (before the first poll, the age counts
from creation: the consumer gets ``worker.liveness_max_poll_age_s`` to join its group). The metrics
server (infra/metrics.py) serves it at ``/livez``: 200 with the report as JSON, or 503. The
compose healthcheck and the image's ``HEALTHCHECK`` read it. Timestamps are plain floats written by
one thread and read by the HTTP thread: no lock needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

__all__ = ["Liveness", "LivenessReport"]


@dataclass(frozen=True, slots=True)
class LivenessReport:
    ok: bool
    loop_tick_age_s: float
    poll_age_s: float
    polls: int
    records_fetched: int
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Liveness:
    def __init__(
        self,
        *,
        max_tick_age_s: float = 15.0,
        max_poll_age_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_tick_age_s = max_tick_age_s
        self.max_poll_age_s = max_poll_age_s
        self._clock = clock
        started = clock()
        self.last_tick = started
        self.last_poll = started
        self.polls = 0
        self.records_fetched = 0

    def tick(self) -> None:
        """Called from the event loop, on a timer."""
        self.last_tick = self._clock()

    def polled(self, records: int) -> None:
        """Called each time the consumer's fetch returns (``records`` may be 0)."""
        self.last_poll = self._clock()
        self.polls += 1
        self.records_fetched += records

    def report(self) -> LivenessReport:
        now = self._clock()
        tick_age, poll_age = now - self.last_tick, now - self.last_poll
        reasons = []
        if tick_age > self.max_tick_age_s:
            reasons.append(f"event loop: no tick for {tick_age:.1f}s (limit {self.max_tick_age_s}s)")
        if poll_age > self.max_poll_age_s:
            reasons.append(f"consumer: no fetch for {poll_age:.1f}s (limit {self.max_poll_age_s}s)")
        return LivenessReport(
            ok=not reasons,
            loop_tick_age_s=round(tick_age, 3),
            poll_age_s=round(poll_age, 3),
            polls=self.polls,
            records_fetched=self.records_fetched,
            reasons=tuple(reasons),
        )
