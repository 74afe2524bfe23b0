"""``FakeVectorStore``: the example bank in memory, with ``MilvusExampleStore``'s semantics.

Same tenant isolation (every read is of one tenant unless the protocol says otherwise), same
``usable`` rule (search skips unusable examples unless asked; get and scan return them), same
overwrite-by-id upsert, same limits and errors. Cosine similarity is computed with numpy over the
tenant's rows. ``tests/contract/test_vector_store.py`` runs one suite over this and the real store.

Test knobs: ``unavailable = True`` makes every call raise ``DependencyUnavailable``; ``calls``
counts calls by method name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from infra.errors import DependencyUnavailable, LimitExceeded, SchemaError
from infra.protocols import Example, SearchHit, rows_by_tenant

__all__ = ["FakeVectorStore"]

# The same limits as infra/milvus_schema.py (kept here so unit tests do not import pymilvus).
MAX_ID_BYTES = 64
MAX_TENANT_BYTES = 64
MAX_TIER_BYTES = 64
MAX_REQUEST_BYTES = 16 * 1024
MAX_RESPONSE_BYTES = 32 * 1024
MAX_LIMIT = 16_384


def _check_key(value: str, what: str, max_bytes: int) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    if not value or len(value.encode()) > max_bytes:
        raise SchemaError(f"{what} must be 1..{max_bytes} bytes, got {value[:80]!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise SchemaError(f"control characters are not allowed in tenant or example ids: {value!r}")


def _check_text(example: Example, field: str, value: str, limit: int) -> None:
    size = len(value.encode())
    if size > limit:
        raise LimitExceeded(
            f"example {example.example_id!r}: {field} is {size} bytes of UTF-8, over the {limit}-byte "
            "limit of the example bank; truncate or skip it before admission"
        )


class FakeVectorStore:
    """Implements ``infra.protocols.VectorStore`` in memory."""

    def __init__(self, dimension: int = 384) -> None:
        self.dimension = dimension
        self.collection = "fake"
        self.unavailable = False
        self.calls: Counter[str] = Counter()
        self._rows: dict[str, Example] = {}
        self._closed = False

    async def __aenter__(self) -> FakeVectorStore:
        await self.ensure_collection()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def ensure_collection(self) -> None:
        self._enter("ensure_collection")

    async def drop(self) -> None:
        self._enter("drop")
        self._rows.clear()

    async def aclose(self) -> None:
        self._closed = True

    # -- VectorStore -------------------------------------------------------------------------------
    async def search(
        self,
        tenant: str,
        vectors: npt.NDArray[np.float32],
        *,
        limit: int,
        include_unusable: bool = False,
        stale_ok: bool = False,  # always fresh here
    ) -> list[list[SearchHit]]:
        self._enter("search")
        _check_key(tenant, "tenant", MAX_TENANT_BYTES)
        matrix = self._matrix(vectors)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be in 1..{MAX_LIMIT}, got {limit}")
        if matrix.shape[0] == 0:
            return []
        candidates = [e for e in self._rows.values() if e.tenant == tenant and (include_unusable or e.usable)]
        if not candidates:
            return [[] for _ in range(matrix.shape[0])]
        bank = np.stack([_unit(e.embedding) for e in candidates])
        queries = np.stack([_unit(row) for row in matrix])
        similarities = queries @ bank.T
        out: list[list[SearchHit]] = []
        for row in similarities:
            order = sorted(range(len(candidates)), key=lambda i: (-row[i], candidates[i].example_id))
            out.append([SearchHit(candidates[i], float(row[i])) for i in order[:limit]])
        return out

    async def search_batch(
        self,
        tenants: Sequence[str],
        vectors: npt.NDArray[np.float32],
        *,
        limit: int,
        include_unusable: bool = False,
        stale_ok: bool = False,
    ) -> list[list[SearchHit]]:
        self.calls["search_batch"] += 1
        matrix = self._matrix(vectors)
        out: list[list[SearchHit]] = [[] for _ in range(matrix.shape[0])]
        for tenant, rows in rows_by_tenant(tenants, matrix.shape[0]).items():
            found = await self.search(tenant, matrix[rows], limit=limit, include_unusable=include_unusable)
            for row, hits in zip(rows, found, strict=True):
                out[row] = hits
        return out

    async def upsert(self, examples: Sequence[Example]) -> None:
        self._enter("upsert")
        checked = [self._checked(e) for e in examples]
        for example in checked:
            self._rows[example.example_id] = example

    async def delete(self, tenant: str, example_ids: Sequence[str]) -> None:
        self._enter("delete")
        _check_key(tenant, "tenant", MAX_TENANT_BYTES)
        for example_id in example_ids:
            row = self._rows.get(example_id)
            if row is not None and row.tenant == tenant:
                del self._rows[example_id]

    async def get(self, tenant: str, example_ids: Sequence[str]) -> list[Example]:
        self._enter("get")
        _check_key(tenant, "tenant", MAX_TENANT_BYTES)
        found = [self._rows.get(i) for i in dict.fromkeys(example_ids)]
        return [e for e in found if e is not None and e.tenant == tenant]

    async def scan(
        self, tenant: str | None = None, *, batch_size: int = 1000, with_embeddings: bool = True
    ) -> list[Example]:
        self._enter("scan")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tenant is not None:
            _check_key(tenant, "tenant", MAX_TENANT_BYTES)
        rows = [e for e in self._rows.values() if tenant is None or e.tenant == tenant]
        if not with_embeddings:
            rows = [replace(e, embedding=np.zeros(0, dtype=np.float32)) for e in rows]
        return sorted(rows, key=lambda e: e.example_id)

    async def count(self, tenant: str | None = None) -> int:
        self._enter("count")
        if tenant is not None:
            _check_key(tenant, "tenant", MAX_TENANT_BYTES)
        return sum(1 for e in self._rows.values() if tenant is None or e.tenant == tenant)

    # -- internals ---------------------------------------------------------------------------------
    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self._closed:
            raise DependencyUnavailable("FakeVectorStore is closed; create a new store")
        if self.unavailable:
            raise DependencyUnavailable("FakeVectorStore is marked unavailable")

    def _matrix(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix.reshape(1, -1)
        if matrix.ndim != 2 or (matrix.shape[0] and matrix.shape[1] != self.dimension):
            raise ValueError(f"search vectors must have shape (n, {self.dimension}), got {matrix.shape}")
        return matrix

    def _checked(self, example: Example) -> Example:
        _check_key(example.example_id, "example_id", MAX_ID_BYTES)
        _check_key(example.tenant, "tenant", MAX_TENANT_BYTES)
        _check_text(example, "request", example.request, MAX_REQUEST_BYTES)
        _check_text(example, "response", example.response, MAX_RESPONSE_BYTES)
        _check_text(example, "model_tier", example.model_tier, MAX_TIER_BYTES)
        vector = np.asarray(example.embedding, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dimension,):
            raise ValueError(
                f"example {example.example_id!r} has a {vector.shape[0]}-d embedding but the store holds "
                f"{self.dimension}-d vectors"
            )
        if not np.isfinite(vector).all() or not vector.any():
            raise ValueError(f"example {example.example_id!r} has a zero or non-finite embedding")
        # Store a private copy, as Milvus would: later changes to the caller's array are not seen.
        stored = vector.copy()
        stored.setflags(write=False)
        return Example(
            example_id=example.example_id,
            tenant=example.tenant,
            request=example.request,
            response=example.response,
            embedding=stored,
            model_tier=example.model_tier,
            quality=float(example.quality),
            gain=float(example.gain),
            offloads=float(example.offloads),
            replay_rounds=int(example.replay_rounds),
            created_at=float(example.created_at),
            updated_at=float(example.updated_at),
            usable=bool(example.usable),
        )


def _unit(vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    v = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(v)
    return v / norm if norm else v
