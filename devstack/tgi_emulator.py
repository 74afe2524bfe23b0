"""``EmulatedEngine``: a TGI backend without a model, for fleet-scale benchmarks.

It plugs into the dev server (``python -m devstack.tgi_dev --engine emulated``) and spends simulated
time instead of compute, following a calibrated service-time model:

* prefill: ``prefill_ms_per_token`` x prompt tokens, ending with the first token (time to first token),
* decode: ``decode_ms_per_token`` per further token,
* batching: while ``n`` sequences run, every step is ``1 + batch_slowdown x (n - 1)`` times slower.

Sequences join and leave between steps (continuous batching), so the step time follows the live
batch size. Output is deterministic filler of exactly ``max_new_tokens`` tokens (stop sequences are
ignored); the text means nothing, the timing is the point. Calibrate the three numbers against the
real engine (docs/tgi.md has the llama.cpp figures) before quoting benchmark results.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from devstack.tgi_dev.engine import SamplingParams, Token

__all__ = ["EmulatedEngine", "ServiceTimeModel"]

_WORDS = (
    " the",
    " model",
    " answer",
    " is",
    " a",
    " short",
    " reply",
    " for",
    " your",
    " request",
    " with",
    " some",
    " words",
    " that",
    " mean",
    " nothing",
    " but",
    " take",
    " time",
    ".",
)


@dataclass(frozen=True, slots=True)
class ServiceTimeModel:
    prefill_ms_per_token: float = 0.5
    decode_ms_per_token: float = 8.0
    batch_slowdown: float = 0.05  # extra step time per additional running sequence, as a fraction

    def __post_init__(self) -> None:
        if min(self.prefill_ms_per_token, self.decode_ms_per_token, self.batch_slowdown) < 0:
            raise ValueError(f"service-time parameters must be non-negative, got {self}")

    def factor(self, running: int) -> float:
        return 1.0 + self.batch_slowdown * max(running - 1, 0)


class EmulatedEngine:
    """Implements ``devstack.tgi_dev.engine.Engine`` with simulated service time."""

    compute_type = "emulated"

    def __init__(
        self,
        *,
        model_id: str = "emulated",
        max_batch_size: int = 8,
        max_total_tokens: int = 4096,
        service: ServiceTimeModel | None = None,
        chars_per_token: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model_id = model_id
        self.max_batch_size = max_batch_size
        self.max_total_tokens = max_total_tokens
        self.service = service or ServiceTimeModel()
        self._chars_per_token = chars_per_token
        self._clock = clock
        self._sleep = sleep
        self.running = 0

    def count_tokens(self, text: str) -> int:
        return max(1, math.ceil(len(text) / self._chars_per_token))

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Token, None]:
        self.running += 1
        try:
            # Step durations are recomputed from the live batch: sequences join and leave between steps.
            deadline = self._clock()
            deadline += self.count_tokens(prompt) * self._step_s(self.service.prefill_ms_per_token)
            for index in range(params.max_new_tokens):
                if index > 0:
                    deadline += self._step_s(self.service.decode_ms_per_token)
                delay = deadline - self._clock()
                if delay > 0:
                    await self._sleep(delay)
                word = (params.seed + index) % len(_WORDS)
                last = index == params.max_new_tokens - 1
                yield Token(id=word, text=_WORDS[word], logprob=0.0, finish_reason="length" if last else None)
        finally:
            self.running -= 1

    async def aclose(self) -> None:
        return None

    def _step_s(self, ms_per_token: float) -> float:
        return ms_per_token * self.service.factor(self.running) / 1000.0
