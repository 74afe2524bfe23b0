"""A TGI-like continuous-batching service-time model: pure, no I/O, no clock (times are passed in).

Three parts, each usable alone:

* ``BatchLimits``: the router limits of TGI's launcher, with its defaults (values and sources below).
* ``BatchScheduler``: TGI's batching loop as a state machine (``backends/v3/src/backend.rs``
  ``batching_task`` and ``queue.rs`` ``State::next_batch``): a FIFO queue; a new batch is taken from
  its head while the prefill tokens stay within ``max_batch_prefill_tokens`` and the prompt plus
  ``max_new_tokens`` of everything running stays within ``max_batch_total_tokens``; while a batch
  runs, waiting requests join (a prefill that pauses the running batch) only when at least
  ``floor(running x waiting_served_ratio)`` of them fit, or when ``max_waiting_tokens`` decode steps
  have passed since the last join. Requests beyond ``max_concurrent_requests`` in the system are
  refused (TGI answers 429 "Model is overloaded").
* ``ServiceModel``: the time of one step. Decode: ms per step as a function of the batch size,
  piecewise-linear through measured points (GPU tables), extended linearly past the last point.
  Prefill: ``fixed_ms + ms_per_token x prompt tokens`` of the whole new batch (one packed pass).

``simulate`` runs a trace through both on a virtual clock and returns each request's first-token and
completion times. The same scheduler drives the real GPU replay (``bench/gpu_replay.py``), so the two
differ only in where step times come from: measured there, modelled here.

TGI launcher defaults (``docs/source/reference/launcher.md`` and ``launcher/src/main.rs`` of
huggingface/text-generation-inference, read 2026-12-04):

=============================  ===========  ==============================================================
setting                        value here   TGI default and why this value
=============================  ===========  ==============================================================
max_concurrent_requests        128          default 128
waiting_served_ratio           0.3          default 0.3 (was 1.2 in early releases)
max_waiting_tokens             20           default 20
max_batch_prefill_tokens       4096         v3 default: ``compute_optimal`` or 4096, capped at the model's
                                            ``max_position_embeddings`` (32768 for Qwen2.5); earlier
                                            launchers used ``max_input_tokens + 50``. 4096 is the fallback
max_batch_total_tokens         from memory  no fixed default: TGI's warm-up sizes the KV cache to the free
                                            GPU memory. ``kv_token_budget`` does the same arithmetic; on an
                                            H200 a 0.5B/1.5B Qwen2.5 leaves millions of tokens, so the
                                            concurrency limit, not the budget, binds
max_batch_size                 None         default unset (only for hardware without unpadded batching)
=============================  ===========  ==============================================================
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "QWEN25_FLASH_PREFILL",
    "QWEN25_H200_MEASURED",
    "QWEN25_H200_NOTES",
    "BatchLimits",
    "BatchScheduler",
    "Job",
    "Outcome",
    "ServiceModel",
    "StepRecord",
    "StepTable",
    "fit_line",
    "kv_token_budget",
    "simulate",
    "take_batch",
]


# -------------------------------------------------------------------------------------------- limits
@dataclass(frozen=True, slots=True)
class BatchLimits:
    """TGI router limits; the defaults are the launcher's (module docstring)."""

    max_concurrent_requests: int = 128
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 1_000_000
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        if min(self.max_concurrent_requests, self.max_batch_prefill_tokens, self.max_batch_total_tokens) < 1:
            raise ValueError(f"limits must be positive, got {self}")
        if self.waiting_served_ratio < 0 or self.max_waiting_tokens < 0:
            raise ValueError(f"waiting_served_ratio and max_waiting_tokens must be >= 0, got {self}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1 or None, got {self.max_batch_size}")


def kv_token_budget(
    *,
    gpu_bytes: float,
    weight_bytes: float,
    kv_bytes_per_token: float,
    memory_fraction: float = 1.0,
    reserve_bytes: float = 4 * 2**30,
) -> int:
    """``max_batch_total_tokens`` as TGI's warm-up finds it: the KV cache that fits in the GPU memory
    left after the weights and a reserve for activations (``reserve_bytes``, an assumption: TGI
    measures its peak with a warm-up prefill of ``max_batch_prefill_tokens``)."""
    free = gpu_bytes * memory_fraction - weight_bytes - reserve_bytes
    if kv_bytes_per_token <= 0 or free <= 0:
        raise ValueError(f"no room for a KV cache: {free=:.3g} bytes, {kv_bytes_per_token=}")
    return int(free // kv_bytes_per_token)


# ---------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True, slots=True)
class Job:
    """One request: when it arrives, its prompt length and how many tokens it generates."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError(f"a job needs at least one prompt and one new token, got {self}")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


def take_batch(
    queue: Sequence[Job],
    *,
    min_size: int | None,
    max_size: int | None,
    prefill_budget: int,
    token_budget: int,
) -> int:
    """How many jobs from the head of ``queue`` form the next batch (0: none), as TGI's
    ``State::next_batch`` decides with paged attention: stop at the first job that would push the
    batch's prompt tokens over ``prefill_budget`` or its prompt plus new tokens over ``token_budget``;
    give up when fewer than ``min_size`` fit."""
    if min_size is not None and len(queue) < min_size:
        return 0
    prefill = decode = taken = 0
    for job in queue:
        if max_size is not None and taken >= max_size:
            break
        prefill += job.prompt_tokens
        decode += job.max_new_tokens
        if prefill > prefill_budget or prefill + decode > token_budget:
            break
        taken += 1
    if min_size is not None and taken < min_size:
        return 0
    return taken


# ------------------------------------------------------------------------------------------ scheduler
@dataclass(slots=True)
class _Running:
    job: Job
    generated: int = 0


@dataclass(slots=True)
class BatchScheduler:
    """TGI's batching loop, one decision at a time. The caller owns the clock and the compute:

    1. ``offer(job)`` when a request arrives (False: refused, over ``max_concurrent_requests``);
    2. ``plan()`` before each step: the jobs to prefill now (possibly none);
    3. ``prefilled(jobs)`` after that prefill ran: each got its first token; returns the finished;
    4. ``decoded()`` after one decode step of every running job; returns the finished.
    """

    limits: BatchLimits = field(default_factory=BatchLimits)
    waiting: deque[Job] = field(default_factory=deque)
    running: dict[str, _Running] = field(default_factory=dict)
    waiting_tokens: int = 0  # decode steps since the last prefill (TGI's ``waiting_tokens``)

    @property
    def in_system(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def offer(self, job: Job) -> bool:
        if self.in_system >= self.limits.max_concurrent_requests:
            return False
        self.waiting.append(job)
        return True

    def plan(self) -> list[Job]:
        lim = self.limits
        if not self.waiting:
            return []
        n = len(self.running)
        if n == 0:
            min_size: int | None = None
        elif self.waiting_tokens >= lim.max_waiting_tokens:
            min_size = None
        else:
            min_size = math.floor(n * lim.waiting_served_ratio)
        reserved = self.reserved_tokens
        max_size = None if lim.max_batch_size is None else max(lim.max_batch_size - n, 0)
        if max_size == 0:
            return []
        count = take_batch(
            self.waiting,
            min_size=min_size,
            max_size=max_size,
            prefill_budget=lim.max_batch_prefill_tokens,
            token_budget=max(lim.max_batch_total_tokens - reserved, 0),
        )
        jobs = [self.waiting.popleft() for _ in range(count)]
        for job in jobs:
            self.running[job.request_id] = _Running(job)
        if jobs:
            self.waiting_tokens = 1
        return jobs

    def drop(self, request_id: str) -> bool:
        """Forget a request (its client went away), waiting or running; False if it is not here."""
        if request_id in self.running:
            del self.running[request_id]
            return True
        for job in self.waiting:
            if job.request_id == request_id:
                self.waiting.remove(job)
                return True
        return False

    @property
    def reserved_tokens(self) -> int:
        """Prompt plus new tokens of the running batch (TGI's ``tgi_batch_current_max_tokens``)."""
        return sum(r.job.total_tokens for r in self.running.values())

    def longest(self) -> int:
        """Tokens in the longest running sequence once this step's token is in (0 when idle)."""
        return max((r.job.prompt_tokens + r.generated for r in self.running.values()), default=0)

    def prefilled(self, jobs: Iterable[Job]) -> list[Job]:
        return self._advance([self.running[j.request_id] for j in jobs])

    def decoded(self) -> list[Job]:
        self.waiting_tokens += 1
        return self._advance(list(self.running.values()))

    def _advance(self, rows: list[_Running]) -> list[Job]:
        done = []
        for row in rows:
            row.generated += 1
            if row.generated >= row.job.max_new_tokens:
                done.append(row.job)
                del self.running[row.job.request_id]
        return done


# ------------------------------------------------------------------------------------------ step time
def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``; returns (a, b)."""
    n = len(xs)
    if n < 2 or len(ys) != n:
        raise ValueError(f"need at least two (x, y) points, got {n} x and {len(ys)} y")
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


@dataclass(frozen=True, slots=True)
class StepTable:
    """Decode ms per step at measured batch sizes; piecewise-linear between them, the last segment's
    slope past the last point, and the first point's value below it."""

    batch: tuple[int, ...]
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.batch) != len(self.ms) or not self.batch:
            raise ValueError(f"need as many step times as batch sizes, at least one: {self}")
        if any(b2 <= b1 for b1, b2 in zip(self.batch, self.batch[1:], strict=False)) or self.batch[0] < 1:
            raise ValueError(f"batch sizes must be increasing and >= 1, got {self.batch}")
        if min(self.ms) <= 0:
            raise ValueError(f"step times must be positive, got {self.ms}")

    def decode_ms(self, batch_size: int) -> float:
        if batch_size < 1:
            raise ValueError(f"a decode step needs at least one sequence, got {batch_size}")
        b, ms = self.batch, self.ms
        if batch_size <= b[0] or len(b) == 1:
            return ms[0]
        i = min(bisect.bisect_left(b, batch_size), len(b) - 1)
        lo, hi = i - 1, i
        frac = (batch_size - b[lo]) / (b[hi] - b[lo])
        return ms[lo] + frac * (ms[hi] - ms[lo])


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """Time of each step of one replica: decode by batch size, prefill by prompt tokens."""

    name: str
    decode: StepTable
    prefill_ms_per_token: float
    prefill_fixed_ms: float = 0.0
    source: str = ""
    # Optional context term: a step whose longest sequence holds ``c`` tokens costs
    # ``(context_ms[0] + context_ms[1] x batch) x (c - context_ref)`` ms more than the table, whose
    # points were measured at context ``context_ref``. (0, 0): the table alone.
    context_ref: int = 0
    context_ms: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.prefill_ms_per_token < 0 or self.prefill_fixed_ms < 0:
            raise ValueError(f"prefill cost must be non-negative, got {self}")

    def prefill_ms(self, tokens: int) -> float:
        return self.prefill_fixed_ms + self.prefill_ms_per_token * tokens

    def decode_ms(self, batch_size: int, longest: int | None = None) -> float:
        base = self.decode.decode_ms(batch_size)
        if longest is None or self.context_ms == (0.0, 0.0):
            return base
        a, b = self.context_ms
        return max(base + (a + b * batch_size) * (longest - self.context_ref), 0.0)

    def scaled(self, factor: float) -> ServiceModel:
        """Every time x ``factor`` (the fleet slows its emulated GPUs down so the host keeps up)."""
        table = StepTable(self.decode.batch, tuple(m * factor for m in self.decode.ms))
        return ServiceModel(
            name=self.name,
            decode=table,
            prefill_ms_per_token=self.prefill_ms_per_token * factor,
            prefill_fixed_ms=self.prefill_fixed_ms * factor,
            source=f"{self.source} x {factor:g}",
            context_ref=self.context_ref,
            context_ms=(self.context_ms[0] * factor, self.context_ms[1] * factor),
        )


# Decode: /work/shared/notes/gpu-qwen-h200.md (random-weight Qwen2.5 shapes, static KV cache, compiled
# decode step, bf16, prompt 256). Prefill: not in those notes; NOT MEASURED here, 0 until the GPU
# replay's fit (bench/results/gpu-replay-h200.json) replaces it.
QWEN25_H200_NOTES: dict[str, ServiceModel] = {
    "qwen2.5-0.5b": ServiceModel(
        "qwen2.5-0.5b", StepTable((1, 16, 64), (1.91, 2.20, 3.32)), 0.0, source="notes: gpu-qwen-h200.md"
    ),
    "qwen2.5-1.5b": ServiceModel(
        "qwen2.5-1.5b", StepTable((1, 16, 64), (3.23, 3.46, 5.20)), 0.0, source="notes: gpu-qwen-h200.md"
    ),
}


# This repo's own GPU measurement (docs/gpu-replay.md, bench/results/gpu-replay-h200.json): the replay
# engine's decode table at context 400 (mean of two calls), its packed-prefill fit (mean of the two
# calls' fits: the fixed part is host-bound and moved 2-3x between them) and the context term fitted
# from its batch x context grid. Checked against that engine's per-request latencies: end-to-end
# within 15% at loads 0.2-1.0 of its capacity; time to first token not (docs/gpu-replay.md).
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128)
QWEN25_H200_MEASURED: dict[str, ServiceModel] = {
    "qwen2.5-0.5b": ServiceModel(
        "qwen2.5-0.5b",
        StepTable(
            _BUCKETS,
            (2.298, 2.408, 2.523, 2.566, 2.646, 2.726, 2.732, 2.799, 2.845, 3.067, 3.049, 3.117, 3.147),
        ),
        prefill_ms_per_token=0.027,
        prefill_fixed_ms=9.34,
        source="measured: gpu-replay-h200.json (H200, random-weight Qwen2.5-0.5B shape)",
        context_ref=401,
        context_ms=(3.1643e-4, 2.32e-6),
    ),
    "qwen2.5-1.5b": ServiceModel(
        "qwen2.5-1.5b",
        StepTable(
            _BUCKETS,
            (3.405, 3.595, 3.727, 3.728, 3.797, 3.864, 3.893, 3.959, 3.994, 4.417, 4.447, 4.508, 4.62),
        ),
        prefill_ms_per_token=0.0374,
        prefill_fixed_ms=9.79,
        source="measured: gpu-replay-h200.json (H200, random-weight Qwen2.5-1.5B shape)",
        context_ref=401,
        context_ms=(4.995e-4, 4.21e-6),
    ),
}


# ------------------------------------------------------------------------------------------- simulate
@dataclass(frozen=True, slots=True)
class Outcome:
    """One job's fate: times in seconds on the trace's clock; ``None`` when refused."""

    request_id: str
    arrival_s: float
    first_token_s: float | None
    done_s: float | None

    @property
    def refused(self) -> bool:
        return self.done_s is None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.arrival_s


@dataclass(frozen=True, slots=True)
class StepRecord:
    kind: str  # "prefill" or "decode"
    start_s: float
    size: int  # sequences (decode) or jobs (prefill)
    tokens: int  # prompt tokens (prefill) or sequences (decode)


def simulate(  # noqa: C901 - one event loop: arrivals, prefill, decode, bookkeeping
    jobs: Sequence[Job],
    service: ServiceModel,
    limits: BatchLimits = BatchLimits(),  # frozen: a shared default is safe
    *,
    steps: list[StepRecord] | None = None,
) -> list[Outcome]:
    """Run ``jobs`` (any order; served by arrival) through one replica on a virtual clock.

    Arrivals are seen between steps, as TGI's batching task sees its queue. ``steps``, when given,
    collects every step for inspection."""
    order = sorted(jobs, key=lambda j: (j.arrival_s, j.request_id))
    sched = BatchScheduler(limits)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    refused: set[str] = set()
    now, i = 0.0, 0
    while i < len(order) or sched.in_system:
        while i < len(order) and order[i].arrival_s <= now:
            if not sched.offer(order[i]):
                refused.add(order[i].request_id)
            i += 1
        if not sched.in_system:
            now = max(now, order[i].arrival_s)
            continue
        new = sched.plan()
        if new:
            tokens = sum(j.prompt_tokens for j in new)
            if steps is not None:
                steps.append(StepRecord("prefill", now, len(new), tokens))
            now += service.prefill_ms(tokens) / 1000.0
            for job in new:
                first[job.request_id] = now
            for job in sched.prefilled(new):
                done[job.request_id] = now
        if sched.batch_size:
            if steps is not None:
                steps.append(StepRecord("decode", now, sched.batch_size, sched.batch_size))
            now += service.decode_ms(sched.batch_size, sched.longest()) / 1000.0
            for job in sched.decoded():
                done[job.request_id] = now
        elif not new and sched.waiting:
            # Nothing runs and nothing fits: only possible when a single job exceeds a budget.
            raise ValueError(f"job {sched.waiting[0]} can never fit the limits {limits}")
    return [
        Outcome(j.request_id, j.arrival_s, first.get(j.request_id), done.get(j.request_id))
        if j.request_id not in refused
        else Outcome(j.request_id, j.arrival_s, None, None)
        for j in jobs
    ]


# The same decode tables with TGI's kind of prefill: attention per sequence on the flash kernel
# (``bench/gpu_prefill.py``). Prefill fit from the calibration of the flash replay
# (bench/results/gpu-replay-flash-h100.json, an H100 80GB: packs of 512-token sequences): 0.0040 /
# 0.0043 ms per token and a host-bound 15.5 / 15.3 ms per pass, against 0.027 / 0.037 ms per token for
# the masked pass. That replay checks this kind of model (its own table, this prefill, the context
# term): end-to-end p50/p90/p99 within 3% / 6% at 0.4 of capacity, 8-17% fast at 0.8
# (docs/gpu-replay.md). The decode tables and context terms stay the H200's.
QWEN25_FLASH_PREFILL: dict[str, ServiceModel] = {
    "qwen2.5-0.5b": replace(
        QWEN25_H200_MEASURED["qwen2.5-0.5b"],
        prefill_ms_per_token=0.00399,
        prefill_fixed_ms=15.48,
        source="decode: gpu-replay-h200.json (H200); prefill: gpu-replay-flash-h100.json flash (H100)",
    ),
    "qwen2.5-1.5b": replace(
        QWEN25_H200_MEASURED["qwen2.5-1.5b"],
        prefill_ms_per_token=0.00433,
        prefill_fixed_ms=15.28,
        source="decode: gpu-replay-h200.json (H200); prefill: gpu-replay-flash-h100.json flash (H100)",
    ),
}
