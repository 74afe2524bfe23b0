"""``ReplyTracker``: what an ``EchoClient`` remembers about its requests, with every structure bounded.

Pure bookkeeping (no Kafka, no clock: callers pass ``now``), so the bounds are unit-tested at any scale.

* **outstanding**: a sent request waiting for its reply, until it is answered or its expiry passes
  (the request's deadline plus a grace for the reply's trip). At most ``max_outstanding`` at once:
  ``track`` first expires what is due, then raises ``ClientOverloaded`` rather than grow.
* **expiries**: a min-heap of (expires_at, id) over the outstanding ids; answered ids are removed
  lazily and the heap is rebuilt once it holds more than twice the live entries, so its size is at
  most ``2 * max_outstanding + 64``.
* **answered** / **expired**: LRUs of the last ``remember_answered`` / ``remember_expired`` ids, only
  to tell a duplicate reply (counted in ``duplicates``) and a late one (counted in ``late``) from a
  reply to someone else's request (``unknown``). Forgetting an id never delivers anything twice: an
  id that is neither outstanding nor remembered is never delivered (unless ``adopt_unknown``).

``adopt_unknown`` is for a client that resumes a private reply topic after a restart (a stable
consumer group, ``client.group_id``): replies to requests its previous run sent are delivered once
instead of being dropped as unknown.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from infra.errors import ClientOverloaded

__all__ = ["Outcome", "ReplyTracker", "Resolution"]

_HEAP_SLACK = 64


class Outcome(Enum):
    DELIVER = "deliver"  # first reply to an outstanding (or adopted) request
    DUPLICATE = "duplicate"  # another reply to a request already answered
    LATE = "late"  # a reply after the request expired (deadline passed, or ask() gave up)
    UNKNOWN = "unknown"  # not a request this client sent (or one it has forgotten)


@dataclass(frozen=True, slots=True)
class Resolution:
    outcome: Outcome
    latency_s: float = 0.0  # send -> reply, for DELIVER of a tracked request


class ReplyTracker:
    def __init__(
        self,
        *,
        max_outstanding: int = 100_000,
        remember_answered: int = 100_000,
        remember_expired: int = 100_000,
        adopt_unknown: bool = False,
    ) -> None:
        if max_outstanding < 1:
            raise ValueError(f"max_outstanding must be at least 1, got {max_outstanding}")
        self.max_outstanding = max_outstanding
        self.remember_answered = max(0, remember_answered)
        self.remember_expired = max(0, remember_expired)
        self.adopt_unknown = adopt_unknown
        self._sent_at: dict[str, float] = {}
        self._expires_at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0
        self.late = 0
        self.expired = 0
        self.unknown = 0

    # -- sending ---------------------------------------------------------------------------------
    def track(self, request_id: str, *, now: float, expires_at: float) -> None:
        """Remember a request about to be sent; ``ClientOverloaded`` if ``max_outstanding`` are waiting."""
        if request_id in self._sent_at:
            raise ValueError(f"request id {request_id!r} is already outstanding; ids must be unique")
        if len(self._sent_at) >= self.max_outstanding:
            self.expire(now)
        if len(self._sent_at) >= self.max_outstanding:
            raise ClientOverloaded(
                f"{len(self._sent_at)} requests are waiting for replies (client.max_outstanding="
                f"{self.max_outstanding}); wait for replies or deadlines, or raise the limit"
            )
        self._answered.pop(request_id, None)
        self._expired.pop(request_id, None)
        self._sent_at[request_id] = now
        self._expires_at[request_id] = expires_at
        heapq.heappush(self._heap, (expires_at, request_id))
        self._compact()

    def expire(self, now: float) -> list[str]:
        """Expire every outstanding request whose expiry is at or before ``now``; returns their ids."""
        gone: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            expires_at, request_id = heapq.heappop(self._heap)
            if self._expires_at.get(request_id) == expires_at:
                self._drop(request_id)
                gone.append(request_id)
        return gone

    def abandon(self, request_id: str) -> None:
        """The caller stopped waiting (``ask()`` timed out): treat a reply that still comes as late."""
        if request_id in self._sent_at:
            self._drop(request_id)

    # -- receiving -------------------------------------------------------------------------------
    def resolve(self, request_id: str, *, now: float) -> Resolution:
        """Classify a reply; DELIVER at most once per id."""
        if request_id in self._answered:
            self._answered.move_to_end(request_id)
            self.duplicates += 1
            return Resolution(Outcome.DUPLICATE)
        sent_at = self._sent_at.pop(request_id, None)
        if sent_at is None:
            if request_id in self._expired:
                self.late += 1
                return Resolution(Outcome.LATE)
            if not self.adopt_unknown:
                self.unknown += 1
                return Resolution(Outcome.UNKNOWN)
            self._remember(self._answered, request_id, self.remember_answered)
            return Resolution(Outcome.DELIVER)
        del self._expires_at[request_id]
        self._remember(self._answered, request_id, self.remember_answered)
        self._compact()
        return Resolution(Outcome.DELIVER, latency_s=now - sent_at)

    # -- introspection ---------------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        return len(self._sent_at)

    def sizes(self) -> dict[str, int]:
        """Entries held by each structure (what the bounds are about)."""
        return {
            "outstanding": len(self._sent_at),
            "expiries": len(self._heap),
            "answered": len(self._answered),
            "expired": len(self._expired),
        }

    # -- internals -------------------------------------------------------------------------------
    def _drop(self, request_id: str) -> None:
        del self._sent_at[request_id]
        del self._expires_at[request_id]
        self.expired += 1
        self._remember(self._expired, request_id, self.remember_expired)

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._expires_at) + _HEAP_SLACK:
            self._heap = [(at, rid) for rid, at in self._expires_at.items()]
            heapq.heapify(self._heap)

    @staticmethod
    def _remember(lru: OrderedDict[str, None], request_id: str, capacity: int) -> None:
        lru[request_id] = None
        lru.move_to_end(request_id)
        while len(lru) > capacity:
            lru.popitem(last=False)
