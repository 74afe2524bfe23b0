"""The example bank's Milvus schema, its filters, and the mapping between ``Example`` and a row.

Pure functions and constants, shared by ``MilvusExampleStore`` (``infra/milvus.py``) and anything
that must build the same filters (tests, benchmarks). Importing this imports pymilvus (for
``DataType``), nothing else heavy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient

from .errors import LimitExceeded, SchemaError
from .protocols import Example, Vector

__all__ = [
    "ALL_FIELDS",
    "MAX_ID_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "MAX_TENANT_BYTES",
    "MAX_TIER_BYTES",
    "SCALAR_FIELDS",
    "batches_by_size",
    "build_schema",
    "chunks",
    "from_row",
    "ids_clause",
    "index_for",
    "partition_key_safe",
    "quote",
    "search_params",
    "tenant_filter",
    "to_row",
    "where",
]

T = TypeVar("T")

MAX_ID_BYTES: Final = 64
MAX_TENANT_BYTES: Final = 64
MAX_TIER_BYTES: Final = 64
MAX_REQUEST_BYTES: Final = 16 * 1024  # Milvus VARCHAR max_length counts UTF-8 bytes
MAX_RESPONSE_BYTES: Final = 32 * 1024

SCALAR_FIELDS: Final = (
    "example_id",
    "tenant",
    "request",
    "response",
    "model_tier",
    "quality",
    "gain",
    "offloads",
    "replay_rounds",
    "created_at",
    "updated_at",
    "usable",
)
ALL_FIELDS: Final = [*SCALAR_FIELDS, "embedding"]
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


# ------------------------------------------------------------------------------------ filters
def quote(value: str) -> str:
    """``value`` as a Milvus filter string literal: double-quoted, ``\\`` and ``"`` escaped.

    Control characters are refused (Milvus Lite's parser knows only ``\\n \\r \\t`` escapes, and no
    tenant or id legitimately holds one), so no value can end the literal and inject a clause.
    """
    if not isinstance(value, str):
        raise TypeError(f"filter values must be str, got {type(value).__name__}")
    if _CONTROL_CHARS.search(value):
        raise SchemaError(f"control characters are not allowed in tenant or example ids: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tenant_filter(tenant: str) -> str:
    """The mandatory clause of every per-tenant read or delete: ``tenant == "<tenant>"``."""
    if not tenant:
        raise SchemaError("tenant must be a non-empty string")
    if len(tenant.encode()) > MAX_TENANT_BYTES:
        raise SchemaError(f"tenant is longer than {MAX_TENANT_BYTES} bytes: {tenant[:80]!r}")
    return f"tenant == {quote(tenant)}"


def ids_clause(ids: Sequence[str]) -> str:
    return "example_id in [" + ", ".join(quote(i) for i in ids) + "]"


def where(tenant: str | None, ids: Sequence[str] | None = None) -> str:
    clauses = [tenant_filter(tenant)] if tenant is not None else []
    if ids is not None:
        clauses.append(ids_clause(ids))
    # An empty filter needs a limit on a server; this one is always true and needs none.
    return " and ".join(clauses) or 'example_id != ""'


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------- schema/rows
def partition_key_safe(version: str) -> bool:
    """Whether upsert honours a partition key on this server (see the module docstring)."""
    if version.startswith("milvus_lite"):
        return True
    match = re.search(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) >= (2, 4)


def index_for(backend: str, configured: str) -> tuple[str, dict[str, Any]]:
    """Index type and build params. Milvus Lite 3.2.2 builds HNSW/IVF only with faiss-cpu installed;
    AUTOINDEX there means HNSW when faiss is importable and a brute-force scan otherwise."""
    if backend == "lite":
        return ("FLAT", {}) if configured == "FLAT" else ("AUTOINDEX", {})
    if configured == "HNSW":
        return "HNSW", {"M": 16, "efConstruction": 200}
    if configured == "IVF_FLAT":
        return "IVF_FLAT", {"nlist": 128}
    return configured, {}


def search_params(index_type: str, limit: int) -> dict[str, Any]:
    params: dict[str, Any] = {"metric_type": "COSINE"}
    if index_type == "HNSW":
        params["params"] = {"ef": max(64, limit)}
    elif index_type == "IVF_FLAT":
        params["params"] = {"nprobe": 16}
    return params


def build_schema(dimension: int, partition_key: bool) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("example_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field("tenant", DataType.VARCHAR, max_length=MAX_TENANT_BYTES, is_partition_key=partition_key)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dimension)
    schema.add_field("request", DataType.VARCHAR, max_length=MAX_REQUEST_BYTES)
    schema.add_field("response", DataType.VARCHAR, max_length=MAX_RESPONSE_BYTES)
    schema.add_field("model_tier", DataType.VARCHAR, max_length=MAX_TIER_BYTES)
    # DOUBLE, not FLOAT: values must round-trip exactly (the fake and Milvus agree bit for bit).
    schema.add_field("quality", DataType.DOUBLE)
    schema.add_field("gain", DataType.DOUBLE)
    schema.add_field("offloads", DataType.DOUBLE)
    schema.add_field("replay_rounds", DataType.INT64)
    schema.add_field("created_at", DataType.DOUBLE)
    schema.add_field("updated_at", DataType.DOUBLE)
    schema.add_field("usable", DataType.BOOL)
    return schema


def check_text(example: Example, field: str, value: str, limit: int) -> None:
    size = len(value.encode())
    if size > limit:
        raise LimitExceeded(
            f"example {example.example_id!r}: {field} is {size} bytes of UTF-8, over the {limit}-byte "
            f"limit of the example bank; truncate or skip it before admission"
        )


def to_row(example: Example, dimension: int) -> dict[str, Any]:
    if len(example.example_id.encode()) > MAX_ID_BYTES or not example.example_id:
        raise SchemaError(f"example_id must be 1..{MAX_ID_BYTES} bytes, got {example.example_id!r}")
    quote(example.example_id)
    tenant_filter(example.tenant)
    check_text(example, "request", example.request, MAX_REQUEST_BYTES)
    check_text(example, "response", example.response, MAX_RESPONSE_BYTES)
    check_text(example, "model_tier", example.model_tier, MAX_TIER_BYTES)
    vector = np.asarray(example.embedding, dtype=np.float32).reshape(-1)
    if vector.shape != (dimension,):
        raise ValueError(
            f"example {example.example_id!r} has a {vector.shape[0]}-d embedding but the collection holds "
            f"{dimension}-d vectors: milvus.dimension and the embedding model disagree"
        )
    if not np.isfinite(vector).all() or not vector.any():
        raise ValueError(f"example {example.example_id!r} has a zero or non-finite embedding")
    return {
        "example_id": example.example_id,
        "tenant": example.tenant,
        "embedding": vector.tolist(),
        "request": example.request,
        "response": example.response,
        "model_tier": example.model_tier,
        "quality": float(example.quality),
        "gain": float(example.gain),
        "offloads": float(example.offloads),
        "replay_rounds": int(example.replay_rounds),
        "created_at": float(example.created_at),
        "updated_at": float(example.updated_at),
        "usable": bool(example.usable),
    }


def to_vector(value: Any) -> Vector:
    if isinstance(value, bytes | bytearray):
        return np.frombuffer(value, dtype=np.float32).copy()
    return np.asarray(value, dtype=np.float32)


def from_row(row: Any) -> Example:
    return Example(
        example_id=str(row["example_id"]),
        tenant=str(row["tenant"]),
        request=str(row["request"]),
        response=str(row["response"]),
        embedding=to_vector(row["embedding"]) if "embedding" in row else np.zeros(0, dtype=np.float32),
        model_tier=str(row["model_tier"]),
        quality=float(row["quality"]),
        gain=float(row["gain"]),
        offloads=float(row["offloads"]),
        replay_rounds=int(row["replay_rounds"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        usable=bool(row["usable"]),
    )


def batches_by_size(rows: list[dict[str, Any]], max_bytes: int) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        row_bytes = len(row["request"]) + len(row["response"]) + 8 * len(row["embedding"]) + 256
        if batch and size + row_bytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += row_bytes
    if batch:
        yield batch
