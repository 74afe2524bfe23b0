"""What the dev server asks of a model: the ``Engine`` protocol and the values it streams.

An engine turns a prompt into a stream of ``Token``s. The server owns everything TGI-shaped around
it (validation, the request queue, metrics, wire formats), so an engine only has to:

* count tokens (for the ``max_input_tokens`` check and ``x-prompt-tokens``),
* render chat messages with its chat template (TGI applies the template server-side),
* stream tokens, the last one carrying ``finish_reason``, without blocking the event loop,
* say how many sequences it can decode at once (``max_batch_size``).

Two engines exist: ``devstack.tgi_dev.llama.LlamaCppEngine`` (the real GGUF model, one sequence at a
time) and ``devstack.tgi_emulator.EmulatedEngine`` (a calibrated service-time model with continuous
batching, for fleet-scale benchmarks).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = ["Engine", "FinishReason", "SamplingParams", "Token"]

# TGI's finish reasons on /generate; the chat route maps them to OpenAI's "stop"/"length".
FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated decoding parameters. ``temperature`` None means greedy (TGI's ``do_sample=false``)."""

    max_new_tokens: int
    seed: int
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature is None


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token as TGI reports it. The last token of a stream has ``finish_reason`` set.

    ``special`` tokens (end of turn, EOS) appear in the token stream but not in ``generated_text``.
    """

    id: int
    text: str
    logprob: float
    special: bool = False
    finish_reason: FinishReason | None = field(default=None)


@runtime_checkable
class Engine(Protocol):
    """A model behind the dev server. ``stream`` must never block the event loop."""

    model_id: str
    max_batch_size: int  # sequences it can decode concurrently; caps the server's --max-batch-size
    max_total_tokens: int  # context window: prompt + generated tokens
    compute_type: str  # reported in the ``x-compute-type`` header (TGI: "gpu+optimized", ...)

    def count_tokens(self, text: str) -> int:
        """Prompt tokens ``text`` costs, including any BOS the engine adds. Cheap: called on the loop."""
        ...

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for ``messages`` (``{"role", "content"}`` dicts) under the model's chat template."""
        ...

    def stream(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Token, None]:
        """Generate up to ``params.max_new_tokens`` tokens for ``prompt``.

        Closing the iterator early (client gone) must stop the work promptly; the iterator's
        ``aclose()`` returns only once the engine is free for the next sequence.
        """
        ...

    async def aclose(self) -> None: ...
