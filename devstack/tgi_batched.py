"""``BatchedEmulatedEngine``: a TGI backend without a model that batches as TGI does.

It plugs into the dev server (``python -m devstack.tgi_dev --engine batched``). One batching task
runs ``devstack.batching.BatchScheduler`` (TGI's batching loop with its launcher limits: prefill and
total token budgets, ``waiting_served_ratio``, ``max_waiting_tokens``) on the event loop's clock and
spends simulated time per step from a ``devstack.batching.ServiceModel``: a packed prefill of the step's
new requests (``fixed + per token``), then one decode step of the whole running batch (a measured
table by batch size, plus a context term). Every running request gets one token per decode step, so
a request's latency depends on everything that shares its replica, as on a GPU.

The dev server's own queue is opened wide (``max_batch_size`` = ``max_concurrent_requests``): the
engine decides who runs, and the server's ``/metrics`` reads ``gauges`` (waiting, running and the
running batch's reserved tokens) from this engine, so ``tgi_queue_size`` means what TGI's does.
Deadlines are absolute (each step starts when the previous one was due), so a late wake-up on a busy
host is caught up rather than added. Output is filler of exactly ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from devstack.batching import BatchLimits, BatchScheduler, Job, ServiceModel
from devstack.tgi_dev.engine import SamplingParams, Token

__all__ = ["BatchedEmulatedEngine", "Gauges"]

_WORDS = (" the", " model", " answer", " is", " a", " short", " reply", " for", " your", " request")


_LIMITS = BatchLimits()  # frozen: one shared default is safe


@dataclass(frozen=True, slots=True)
class Gauges:
    waiting: int
    running: int
    running_max_tokens: int


class BatchedEmulatedEngine:
    """Implements ``devstack.tgi_dev.engine.Engine``; batches across concurrent ``stream`` calls."""

    compute_type = "emulated-batched"

    def __init__(
        self,
        *,
        service: ServiceModel,
        limits: BatchLimits = _LIMITS,
        model_id: str = "emulated-batched",
        max_total_tokens: int = 32_768,
        chars_per_token: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.model_id = model_id
        self.service = service
        self.limits = limits
        self.max_batch_size = limits.max_concurrent_requests  # the server admits; this engine batches
        self.max_total_tokens = max_total_tokens
        self._chars_per_token = chars_per_token
        self._clock, self._sleep = clock, sleep
        self._sched = BatchScheduler(limits)
        self._outboxes: dict[str, asyncio.Queue[int]] = {}
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    @property
    def gauges(self) -> Gauges:
        s = self._sched
        return Gauges(len(s.waiting), s.batch_size, s.reserved_tokens)

    def count_tokens(self, text: str) -> int:
        return max(1, math.ceil(len(text) / self._chars_per_token))

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Token, None]:
        rid = f"q{next(self._ids)}"
        job = Job(rid, self._clock(), self.count_tokens(prompt), max(params.max_new_tokens, 1))
        if not self._sched.offer(job):
            raise RuntimeError(
                f"over max_concurrent_requests ({self.limits.max_concurrent_requests}): the dev server's "
                "queue must refuse first (run it with --max-batch-size equal to --max-concurrent-requests)"
            )
        outbox: asyncio.Queue[int] = asyncio.Queue()
        self._outboxes[rid] = outbox
        self._kick()
        try:
            for index in range(job.max_new_tokens):
                await outbox.get()
                word = (params.seed + index) % len(_WORDS)
                last = index == job.max_new_tokens - 1
                yield Token(id=word, text=_WORDS[word], logprob=0.0, finish_reason="length" if last else None)
        finally:
            self._outboxes.pop(rid, None)
            self._sched.drop(rid)  # a client that went away frees its place at once

    def _kick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batching")

    async def _run(self) -> None:
        """TGI's batching task: prefill what the scheduler admits, then one decode step of everyone."""
        assert self._wake is not None
        due = self._clock()
        while True:
            if not self._sched.in_system:
                self._wake.clear()
                await self._wake.wait()
                due = self._clock()
                continue
            due = max(due, self._clock())
            new = self._sched.plan()
            if new:
                due += self.service.prefill_ms(sum(j.prompt_tokens for j in new)) / 1000.0
                await self._until(due)
                self._deliver([j.request_id for j in new])
                self._sched.prefilled([j for j in new if j.request_id in self._sched.running])
            if self._sched.batch_size:
                ids = list(self._sched.running)
                due += self.service.decode_ms(len(ids), self._sched.longest()) / 1000.0
                await self._until(due)
                self._deliver(ids)
                self._sched.decoded()
                self.steps += 1

    async def _until(self, deadline: float) -> None:
        delay = deadline - self._clock()
        if delay > 0:
            await self._sleep(delay)

    def _deliver(self, ids: Sequence[str]) -> None:
        for rid in ids:
            outbox = self._outboxes.get(rid)
            if outbox is not None:
                outbox.put_nowait(1)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
