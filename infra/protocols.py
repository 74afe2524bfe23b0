"""The small interfaces every external system hides behind, and the plain values they exchange.

Agents and policies depend on these, never on pymilvus, httpx or sentence-transformers directly,
so unit tests run on fakes (``tests/fakes``) and contract tests hold fakes and real adapters to the
same behaviour. Values here are frozen dataclasses with no I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "AnsweredFeed",
    "AnsweredSink",
    "BackendInfo",
    "ChatMessage",
    "Embedder",
    "Example",
    "Generation",
    "GenerationParams",
    "Generator",
    "QueueDepth",
    "QueueDepthProbe",
    "SearchHit",
    "StreamChunk",
    "StreamingGenerator",
    "VectorStore",
    "rows_by_tenant",
]

Vector = npt.NDArray[np.float32]


# ----------------------------------------------------------------------------------------- values
@dataclass(frozen=True, slots=True)
class Example:
    """A cached request/response pair: one row of the example bank (one Milvus entity)."""

    example_id: str  # stable: sha256(tenant, normalised request)[:32]
    tenant: str
    request: str
    response: str
    embedding: Vector
    model_tier: str = "large"
    quality: float = 0.5  # estimated quality of ``response`` in [0, 1]
    gain: float = 0.0  # replay priority G(e), an EMA
    offloads: float = 0.0  # decayed count of successful offloads this example enabled (eviction value)
    replay_rounds: int = 0
    created_at: float = 0.0  # unix seconds
    updated_at: float = 0.0
    usable: bool = True  # False once an example is found harmful or is quarantined

    @property
    def stored_bytes(self) -> int:
        return len(self.request.encode()) + len(self.response.encode())


@dataclass(frozen=True, slots=True)
class SearchHit:
    example: Example
    similarity: float  # cosine similarity in [-1, 1]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float | None = None  # None = greedy
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_p: float | None = None  # None = the backend's default (no nucleus truncation)


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    backend: str
    generated_tokens: int = 0
    prompt_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str = ""


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One streamed delta; the last chunk has ``finish_reason`` (and the token counts when known)."""

    text: str
    finish_reason: str = ""
    generated_tokens: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend's ``/info`` says (TGI fields we use)."""

    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """One scrape of a backend's load gauges. ``at`` is the monotonic time of the scrape.

    ``healthy`` is False when the last scrape failed; ``waiting``/``running`` then keep the last good
    values (or 0 if none) and consumers must treat the sample by its age and health, not its numbers.
    """

    backend: str
    waiting: float  # tgi_queue_size
    running: float  # tgi_batch_current_size
    at: float
    healthy: bool = True

    @property
    def total(self) -> float:
        return self.waiting + self.running


def rows_by_tenant(tenants: Sequence[str], rows: int) -> dict[str, list[int]]:
    """Row indexes per tenant, tenants in first-seen order (``VectorStore.search_batch``'s grouping)."""
    if isinstance(tenants, str) or len(tenants) != rows:
        raise ValueError(f"search_batch needs one tenant per query row: {rows} rows, tenants {tenants!r:.80}")
    out: dict[str, list[int]] = {}
    for row, tenant in enumerate(tenants):
        out.setdefault(tenant, []).append(row)
    return out


# ------------------------------------------------------------------------------------- protocols
class AnsweredSink(Protocol):
    def __call__(self, request_id: str, value: bytes, answered_at: float) -> None: ...


@runtime_checkable
class AnsweredFeed(Protocol):
    """Every answer on the answered topic (``<prefix>.answered``), handed to a sink as it is read."""

    def subscribe(self, sink: AnsweredSink) -> None:
        """Hand every answer read from now on to ``sink`` (request id, value bytes, wall-clock seconds)."""
        ...

    async def catch_up(self) -> None:
        """Return once every answer written before the call has been handed to the sinks."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Embedder(Protocol):
    dimension: int

    async def embed(self, texts: Sequence[str]) -> Vector:
        """Unit-normalised float32 embeddings, shape (len(texts), dimension). Never blocks the loop."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class VectorStore(Protocol):
    async def search(
        self,
        tenant: str,
        vectors: Vector,
        *,
        limit: int,
        include_unusable: bool = False,
        stale_ok: bool = False,
    ) -> list[list[SearchHit]]:
        """Nearest examples of ``tenant`` only, for each row of ``vectors``, best first.

        ``stale_ok``: the caller does not need this process's latest additions (the request path:
        an example admitted a moment ago may be missed); what this process took back (deleted or
        marked unusable) is still never returned."""
        ...

    async def search_batch(
        self,
        tenants: Sequence[str],
        vectors: Vector,
        *,
        limit: int,
        include_unusable: bool = False,
        stale_ok: bool = False,
    ) -> list[list[SearchHit]]:
        """``search`` for a batch whose row i belongs to ``tenants[i]``: row i's hits are of that tenant
        only. One store call per distinct tenant, all in flight at once (one call for a one-tenant batch)."""
        ...

    async def upsert(self, examples: Sequence[Example]) -> None: ...

    async def delete(self, tenant: str, example_ids: Sequence[str]) -> None: ...

    async def get(self, tenant: str, example_ids: Sequence[str]) -> list[Example]: ...

    async def scan(
        self, tenant: str | None = None, *, batch_size: int = 1000, with_embeddings: bool = True
    ) -> list[Example]:
        """Every stored example (of ``tenant`` if given): for export, eviction and rebuild checks.
        ``with_embeddings=False``: every ``embedding`` is an empty array (eviction needs none)."""
        ...

    async def count(self, tenant: str | None = None) -> int: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Generator(Protocol):
    """One TGI-protocol backend."""

    name: str

    async def generate(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Generation:
        """Raises a ``BackendError`` subclass on failure (see infra/errors.py for retriability)."""
        ...

    async def info(self) -> BackendInfo: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamingGenerator(Generator, Protocol):
    """A ``Generator`` that can also stream: the same generation as ordered ``StreamChunk`` deltas,
    the last one with ``finish_reason`` and the token counts. Failures raise ``BackendError``."""

    def generate_stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]: ...


@runtime_checkable
class QueueDepthProbe(Protocol):
    def snapshot(self) -> Mapping[str, QueueDepth]:
        """The latest sample per backend name; a backend never scraped is absent."""
        ...
