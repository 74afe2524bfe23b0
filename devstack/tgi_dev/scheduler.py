"""The dev server's request queue: FIFO admission to at most ``max_batch_size`` running generations.

Semantics (TGI's, as far as a single-process server can have them):

1. ``enqueue`` refuses with ``QueueFull`` when waiting + running already equals
   ``max_concurrent_requests`` (the server answers 429 "Model is overloaded").
2. Admitted tickets wait in FIFO order; a ticket runs once fewer than ``max_batch_size`` run.
3. ``release`` is idempotent and works in any state: a ticket cancelled while waiting (its client
   went away) leaves the queue without ever running; a running one frees its slot and the next
   waiting ticket starts.

So ``waiting`` is ``tgi_queue_size`` and ``running`` is ``tgi_batch_current_size``, read live at
scrape time: the gauges tell the truth under load. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["QueueFull", "RequestQueue", "Ticket"]


class QueueFull(Exception):
    """waiting + running reached ``max_concurrent_requests``."""


@dataclass(eq=False)
class Ticket:
    prompt_tokens: int
    max_new_tokens: int
    enqueued_at: float
    admitted: asyncio.Future[None]
    started_at: float | None = None
    state: Literal["waiting", "running", "done"] = field(default="waiting")

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    def queue_time(self, now: float) -> float:
        return (self.started_at if self.started_at is not None else now) - self.enqueued_at


class RequestQueue:
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_concurrent_requests: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_concurrent_requests < 1:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) and max_concurrent_requests ({max_concurrent_requests}) "
                "must both be at least 1"
            )
        self.max_batch_size = max_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self._clock = clock
        self._waiting: deque[Ticket] = deque()
        self._running: set[Ticket] = set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def running_max_tokens(self) -> int:
        """Tokens reserved by the running batch (``tgi_batch_current_max_tokens``)."""
        return sum(t.reserved_tokens for t in self._running)

    def enqueue(self, *, prompt_tokens: int, max_new_tokens: int) -> Ticket:
        if self.waiting + self.running >= self.max_concurrent_requests:
            raise QueueFull(
                f"{self.waiting} waiting + {self.running} running reached --max-concurrent-requests "
                f"{self.max_concurrent_requests}"
            )
        ticket = Ticket(
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            enqueued_at=self._clock(),
            admitted=asyncio.get_running_loop().create_future(),
        )
        self._waiting.append(ticket)
        self._dispatch()
        return ticket

    async def wait_turn(self, ticket: Ticket) -> None:
        """Return once ``ticket`` runs. Cancelling the caller cancels the wait; call ``release`` after."""
        await ticket.admitted

    def release(self, ticket: Ticket) -> None:
        if ticket.state == "waiting":
            self._waiting.remove(ticket)
            ticket.admitted.cancel()
        elif ticket.state == "running":
            self._running.discard(ticket)
        ticket.state = "done"
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            ticket = self._waiting.popleft()
            if ticket.admitted.done():  # its waiter was cancelled before release() ran
                ticket.state = "done"
                continue
            ticket.state = "running"
            ticket.started_at = self._clock()
            self._running.add(ticket)
            ticket.admitted.set_result(None)
