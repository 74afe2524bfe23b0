"""``MilvusExampleStore``: the example bank in Milvus, one code path for a server and Milvus Lite.

``MilvusSettings.uri`` picks the back-end: ``http://host:19530`` is a Milvus server (the embedded one
from the ``milvus`` wheel, or standalone in docker-compose); a path ending in ``.db`` is Milvus Lite
(in-process, one process only: it locks the file). Every call below is the same for both; the only
differences are decided once, in ``ensure_collection()`` (see ``_Capabilities``).

Clients (measured with pymilvus 3.0.2, see docs/local-stack.md):

* data plane (search, upsert, query, delete, count): ``AsyncMilvusClient`` with a dedicated channel,
  against both back-ends. It is as fast as the sync client and needs no thread.
* control plane (create/describe/load/drop a collection): the sync ``MilvusClient`` in a worker
  thread. ``AsyncMilvusClient.create_index`` always polls ``AllocTimestamp``, which Milvus Lite
  3.2.2 does not implement (``UNIMPLEMENTED``), so async collection creation fails on Lite.

Tenancy: every search, get, delete, count and scan of one tenant carries the filter built by
``tenant_filter()`` (the value escaped by ``quote()``), so no example ever crosses tenants. ``tenant``
is also the partition key where the server handles it correctly: Milvus Lite and servers >= 2.4.
Milvus 2.3.5 (the embedded server) routes ``upsert`` rows with a partition key to the wrong
partition (milvus-io/milvus#30607, fixed by #30772 in 2024), so there it is a plain field.

Consistency: ``MilvusSettings.consistency_level`` (default ``Session``: read-your-writes for this
client) is set on the collection and on every read, except that reads between a delete and the next
upsert are ``Strong`` (Milvus 2.3.5 gives deletes no timestamp for Session to wait on; see
``_read_level``). A ``search(stale_ok=True)`` (the request path) reads at ``search_consistency``
(default ``Bounded``) instead: under load this client writes an admission every few requests, and a
Session search then waits for the query nodes to reach that write's timestamp, the next time tick
(measured at 10 req/s, 2k examples: retrieve 145 ms p50 at Session, 10 ms at Bounded;
BENCHMARKS.md). A request does not need the example admitted a moment ago; it must not see one that
was taken back, so for ``_EXACT_AFTER_RETRACT_S`` after a delete or an upsert that marks an example
unusable, searches read at the exact level again (see ``_search_level``).

Schema, filters and row mapping: ``infra/milvus_schema.py``.

Errors: pymilvus and gRPC failures become ``DependencyUnavailable`` (retriable) with a message that
says what to check; an example whose text is longer than the schema allows raises ``LimitExceeded``;
a vector of the wrong dimension raises ``ValueError`` (a configuration mismatch, not bad input).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import grpc
import numpy as np
from pymilvus import AsyncMilvusClient, MilvusClient, MilvusException

from .errors import DependencyUnavailable
from .milvus_schema import (
    ALL_FIELDS,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    SCALAR_FIELDS,
    batches_by_size,
    build_schema,
    chunks,
    from_row,
    ids_clause,
    index_for,
    partition_key_safe,
    quote,
    search_params,
    tenant_filter,
    to_row,
    where,
)
from .protocols import Example, SearchHit, Vector, rows_by_tenant
from .settings import MilvusSettings

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "MilvusExampleStore",
    "quote",
    "tenant_filter",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_IDS_PER_EXPRESSION: Final = 512  # keeps filter expressions short
_UPSERT_BATCH_BYTES: Final = 8 * 1024 * 1024  # well under gRPC's 64 MiB message limit
_MAX_LIMIT: Final = 16_384  # Milvus topk limit
_NUM_PARTITIONS: Final = 16
_OPEN_DEADLINE_S: Final = 90.0  # a server's first load after a restart can take tens of seconds
_EXACT_AFTER_RETRACT_S: Final = 5.0  # Milvus's default Bounded staleness (common.gracefulTime, 5 s)
# Milvus Lite 3.2.2 keeps new rows in a Python memtable until 128 MiB and searches it by brute force
# (about 0.1 s per search at 1k rows, over 5 s at 20k under load); flushing moves rows into indexed
# segments (about 0.4 s per 1k rows). The store flushes Lite after this many new rows.
_LITE_FLUSH_ROWS: Final = 1000


@dataclass(frozen=True, slots=True)
class _Capabilities:
    """What differs between back-ends, decided once when the collection is opened."""

    backend: Literal["server", "lite"]
    server_version: str
    index_type: str
    partition_key: bool  # tenant is the partition key of the collection as it exists


# ------------------------------------------------------------------------------------- the store
class MilvusExampleStore:
    """Implements ``infra.protocols.VectorStore`` over pymilvus 3.0.2 (server URI or Lite ``.db`` path).

    ``collection`` overrides ``settings.collection`` (tests use one collection each). Open with
    ``async with MilvusExampleStore(settings) as store:`` (connects and runs ``ensure_collection()``),
    or call ``ensure_collection()`` directly; ``aclose()`` is idempotent.
    """

    def __init__(self, settings: MilvusSettings, *, collection: str | None = None) -> None:
        self._settings = settings
        self.collection = collection or settings.collection
        self.uri = settings.uri
        self.backend: Literal["server", "lite"] = "lite" if settings.uri.endswith(".db") else "server"
        self.dimension = settings.dimension
        self._sync: MilvusClient | None = None
        self._async: AsyncMilvusClient | None = None
        self._caps: _Capabilities | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._unseen_delete = False  # see _read_level()
        self._exact_until = 0.0  # monotonic; see _search_level()
        self._unflushed_rows = 0  # Lite only, see _LITE_FLUSH_ROWS

    def __repr__(self) -> str:
        return f"MilvusExampleStore(uri={self.uri!r}, collection={self.collection!r})"

    # -- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.ensure_collection()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async_client, self._async = self._async, None
        sync_client, self._sync = self._sync, None
        if async_client is not None:
            try:
                await async_client.close()
            except (MilvusException, grpc.RpcError, OSError) as exc:
                log.warning("closing the async Milvus client for %s failed: %s", self.uri, exc)
        if sync_client is not None:
            try:
                await asyncio.to_thread(sync_client.close)
            except (MilvusException, grpc.RpcError, OSError) as exc:
                log.warning("closing the Milvus client for %s failed: %s", self.uri, exc)

    @property
    def capabilities(self) -> _Capabilities | None:
        """What ``ensure_collection()`` found (None before it ran)."""
        return self._caps

    async def ensure_collection(self) -> None:
        """Connect, and create, index and load the collection unless it exists. Idempotent."""
        if self._caps is not None:
            return
        async with self._open_lock:
            if self._caps is not None:
                return
            self._check_open()
            started = time.monotonic()
            self._caps = await self._guard(
                "open the collection", asyncio.to_thread(self._open_sync), deadline_s=_OPEN_DEADLINE_S
            )
            self._async = AsyncMilvusClient(
                uri=self._client_uri(),
                token=self._token(),
                db_name=self._db_name(),
                dedicated=True,
                **self._grpc_kwargs(),
            )
            log.info(
                "milvus %s (%s): collection %s ready in %.2f s (index %s, partition key %s)",
                self.uri,
                self._caps.server_version,
                self.collection,
                time.monotonic() - started,
                self._caps.index_type,
                self._caps.partition_key,
            )

    async def drop(self) -> None:
        """Drop the collection (tests and ``rebuild``); the next call recreates it."""
        self._check_open()
        if self._sync is None:
            await self._guard("connect", asyncio.to_thread(self._connect_sync))
        client = self._sync
        assert client is not None

        def _drop() -> None:
            if client.has_collection(self.collection, timeout=self._settings.timeout_s):
                client.drop_collection(self.collection, timeout=self._settings.timeout_s)

        await self._guard("drop the collection", asyncio.to_thread(_drop))
        self._caps = None

    # -- VectorStore -------------------------------------------------------------------------------
    async def search(
        self,
        tenant: str,
        vectors: Vector,
        *,
        limit: int,
        include_unusable: bool = False,
        stale_ok: bool = False,
    ) -> list[list[SearchHit]]:
        """The ``limit`` nearest examples of ``tenant`` for each row of ``vectors``, best first;
        ``stale_ok`` reads at ``search_consistency`` (see ``_search_level``)."""
        where = tenant_filter(tenant)
        matrix = self._matrix(vectors)
        if not 1 <= limit <= _MAX_LIMIT:
            raise ValueError(f"limit must be in 1..{_MAX_LIMIT}, got {limit}")
        if matrix.shape[0] == 0:
            return []
        if not include_unusable:
            where += " and usable == true"
        client, caps = await self._client()
        results = await self._guard(
            "search",
            client.search(
                self.collection,
                data=matrix.tolist(),
                anns_field="embedding",
                filter=where,
                limit=limit,
                output_fields=ALL_FIELDS,
                search_params=search_params(caps.index_type, limit),
                consistency_level=self._search_level() if stale_ok else self._read_level(),
                timeout=self._settings.timeout_s,
            ),
        )
        out: list[list[SearchHit]] = []
        for hits in results:
            row_hits = [SearchHit(from_row(hit["entity"]), float(hit["distance"])) for hit in hits]
            row_hits.sort(key=lambda h: -h.similarity)
            out.append(row_hits)
        return out

    async def search_batch(
        self,
        tenants: Sequence[str],
        vectors: Vector,
        *,
        limit: int,
        include_unusable: bool = False,
        stale_ok: bool = False,
    ) -> list[list[SearchHit]]:
        """Row i's ``limit`` nearest examples of ``tenants[i]``: one ``search`` per distinct tenant (the
        same filter, ``limit``, output fields and consistency level), all in flight at once."""
        matrix = self._matrix(vectors)
        rows_of = rows_by_tenant(tenants, matrix.shape[0])
        found = await asyncio.gather(
            *(
                self.search(
                    t, matrix[rows], limit=limit, include_unusable=include_unusable, stale_ok=stale_ok
                )
                for t, rows in rows_of.items()
            )
        )
        out: list[list[SearchHit]] = [[] for _ in range(matrix.shape[0])]
        for rows, hits in zip(rows_of.values(), found, strict=True):
            for row, row_hits in zip(rows, hits, strict=True):
                out[row] = row_hits
        return out

    async def upsert(self, examples: Sequence[Example]) -> None:
        """Insert or overwrite by ``example_id`` (the last of duplicates in one call wins)."""
        if not examples:
            return
        client, _ = await self._client()
        latest = {e.example_id: e for e in examples}
        rows = [to_row(e, self.dimension) for e in latest.values()]
        for batch in batches_by_size(rows, _UPSERT_BATCH_BYTES):
            await self._guard(
                "upsert", client.upsert(self.collection, batch, timeout=self._settings.timeout_s)
            )
        # This write's timestamp is later than any earlier delete's, so Session covers those again.
        self._unseen_delete = False
        if any(not e.usable for e in latest.values()):
            self._retracted()
        if self.backend == "lite":
            self._unflushed_rows += len(rows)
            if self._unflushed_rows >= _LITE_FLUSH_ROWS:
                await self._flush()

    async def delete(self, tenant: str, example_ids: Sequence[str]) -> None:
        """Delete these ids of ``tenant``; ids of other tenants or unknown ids are left alone.

        Two steps: read which of the ids belong to ``tenant`` (a read at the store's consistency
        level, so it sees this client's writes), then delete those by primary key. Milvus 2.3.5
        resolves a delete filter on other fields with a query that can miss rows written a moment
        earlier (measured: an upsert followed at once by a filtered delete deleted nothing).
        """
        tenant_filter(tenant)
        if not example_ids:
            return
        client, _ = await self._client()
        for chunk in chunks(sorted(set(example_ids)), _IDS_PER_EXPRESSION):
            rows = await self._guard(
                "delete",
                client.query(
                    self.collection,
                    filter=where(tenant, chunk),
                    output_fields=["example_id"],
                    consistency_level=self._read_level(),
                    timeout=self._settings.timeout_s,
                ),
            )
            owned = sorted({str(r["example_id"]) for r in rows})
            if owned:
                self._unseen_delete = True
                self._retracted()
                await self._guard(
                    "delete",
                    client.delete(
                        self.collection, filter=ids_clause(owned), timeout=self._settings.timeout_s
                    ),
                )

    async def get(self, tenant: str, example_ids: Sequence[str]) -> list[Example]:
        """The examples of ``tenant`` among ``example_ids`` (unusable ones too), in the order asked."""
        tenant_filter(tenant)
        if not example_ids:
            return []
        found = {e.example_id: e for e in await self._fetch(tenant, sorted(set(example_ids)))}
        return [found[i] for i in dict.fromkeys(example_ids) if i in found]

    async def scan(
        self, tenant: str | None = None, *, batch_size: int = 1000, with_embeddings: bool = True
    ) -> list[Example]:
        """Every example (of ``tenant`` if given), sorted by ``example_id``, fetched ``batch_size`` at a time.
        ``with_embeddings=False`` leaves the vectors out (an empty ``embedding``): they are most of the
        bytes Milvus sends and the CPU pymilvus spends decoding (about a third of a serving worker's CPU
        while eviction scanned 100k examples every minute; docs/profiles, BENCHMARKS.md).

        Two phases, so paging does not depend on result order (Milvus Lite returns query pages in
        insertion order, a server in key order): first every matching id, then the rows by id.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        client, _ = await self._client()
        rows = await self._guard(
            "scan",
            client.query(
                self.collection,
                filter=where(tenant),
                output_fields=["example_id"],
                consistency_level=self._read_level(),
                timeout=self._settings.timeout_s,
            ),
        )
        ids = sorted({str(r["example_id"]) for r in rows})
        out: list[Example] = []
        fields = ALL_FIELDS if with_embeddings else SCALAR_FIELDS
        for chunk in chunks(ids, min(batch_size, _IDS_PER_EXPRESSION)):
            out.extend(await self._fetch(tenant, chunk, fields))
        out.sort(key=lambda e: e.example_id)
        return out

    async def count(self, tenant: str | None = None) -> int:
        client, _ = await self._client()
        rows = await self._guard(
            "count",
            client.query(
                self.collection,
                filter=where(tenant),
                output_fields=["count(*)"],
                consistency_level=self._read_level(),
                timeout=self._settings.timeout_s,
            ),
        )
        return int(rows[0]["count(*)"]) if rows else 0

    # -- internals ---------------------------------------------------------------------------------
    async def _fetch(
        self, tenant: str | None, ids: Sequence[str], fields: Sequence[str] = ALL_FIELDS
    ) -> list[Example]:
        client, _ = await self._client()
        out: list[Example] = []
        for chunk in chunks(ids, _IDS_PER_EXPRESSION):
            rows = await self._guard(
                "get",
                client.query(
                    self.collection,
                    filter=where(tenant, chunk),
                    output_fields=list(fields),
                    consistency_level=self._read_level(),
                    timeout=self._settings.timeout_s,
                ),
            )
            out.extend(from_row(r) for r in rows)
        return out

    async def _flush(self) -> None:
        client = self._sync
        assert client is not None
        self._unflushed_rows = 0
        await self._guard(
            "flush",
            asyncio.to_thread(client.flush, self.collection, timeout=_OPEN_DEADLINE_S),
            deadline_s=_OPEN_DEADLINE_S,
        )

    def _read_level(self) -> str:
        """The consistency level of the next read.

        ``Session`` waits for this client's last write timestamp, which pymilvus takes from each
        mutation's reply. Milvus 2.3.5 replies to a delete without a timestamp, so a Session read right
        after a delete can still see the deleted rows (measured). Until the next upsert, reads after
        a delete are therefore ``Strong`` (about 200 ms instead of 3 ms; deletes are rare: eviction).
        """
        level = self._settings.consistency_level
        return "Strong" if level == "Session" and self._unseen_delete else level

    def _search_level(self) -> str:
        """The consistency level of the next ``search``: ``search_consistency``, or the exact read level
        while a retraction (delete, or an example marked unusable) may not have reached the query
        nodes yet, so that a search never shows what this client has taken back."""
        level = self._settings.search_consistency
        if level is None or time.monotonic() < self._exact_until:
            return self._read_level()
        return level

    def _retracted(self) -> None:
        self._exact_until = time.monotonic() + _EXACT_AFTER_RETRACT_S

    def _matrix(self, vectors: Vector) -> Vector:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix.reshape(1, -1)
        if matrix.ndim != 2 or (matrix.shape[0] and matrix.shape[1] != self.dimension):
            raise ValueError(
                f"search vectors must have shape (n, {self.dimension}), got {matrix.shape}: "
                "milvus.dimension and the embedding model disagree"
            )
        return matrix

    async def _client(self) -> tuple[AsyncMilvusClient, _Capabilities]:
        await self.ensure_collection()
        self._check_open()
        assert self._async is not None and self._caps is not None
        return self._async, self._caps

    def _check_open(self) -> None:
        if self._closed:
            raise DependencyUnavailable(f"{self!r} is closed; create a new store")

    async def _guard(self, op: str, call: Awaitable[T], *, deadline_s: float | None = None) -> T:
        """Await a pymilvus call, turning its failures into ``DependencyUnavailable``."""
        try:
            # A backstop: pymilvus retries UNAVAILABLE internally and honours ``timeout`` only per try.
            async with asyncio.timeout(deadline_s or self._settings.timeout_s * 2 + 1):
                return await call
        except (MilvusException, grpc.RpcError, OSError, TimeoutError) as exc:
            detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise DependencyUnavailable(
                f"Milvus at {self.uri} could not {op} on collection {self.collection!r}: {detail}. "
                + self._hint()
            ) from exc

    def _hint(self) -> str:
        if self.backend == "lite":
            return (
                "Check that the .db file's folder is writable and that no other process has it open "
                "(Milvus Lite locks the file; use a Milvus server for several workers)."
            )
        return (
            "Check that the server is running (`echolm up` starts one; docker-compose in production), "
            "that milvus.uri and milvus.token are right, and the server logs."
        )

    # -- sync control plane (runs in a worker thread) -----------------------------------------------
    def _client_uri(self) -> str:
        if self.backend == "lite":
            path = Path(self.uri).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return str(path)
        return self.uri

    def _token(self) -> str:
        return self._settings.token.get_secret_value() if self._settings.token else ""

    def _db_name(self) -> str:
        # Milvus Lite has only the default database.
        return "" if self.backend == "lite" else self._settings.db_name

    def _grpc_kwargs(self) -> dict[str, Any]:
        """No keepalive pings to Milvus Lite: its in-process server answers pymilvus's 10 s pings with
        GOAWAY ``too_many_pings`` (seen in a 5-minute benchmark), which drops the connection."""
        if self.backend != "lite":
            return {}
        return {
            "grpc_options": {
                "grpc.keepalive_time_ms": 2**31 - 1,
                "grpc.keepalive_permit_without_calls": False,
            }
        }

    def _connect_sync(self) -> MilvusClient:
        if self._sync is None:
            self._sync = MilvusClient(
                uri=self._client_uri(),
                token=self._token(),
                db_name=self._db_name(),
                timeout=self._settings.timeout_s,
                **self._grpc_kwargs(),
            )
        return self._sync

    def _open_sync(self) -> _Capabilities:
        client = self._connect_sync()
        timeout = self._settings.timeout_s
        version = str(client.get_server_version(timeout=timeout))
        name = self.collection
        if client.has_collection(name, timeout=timeout):
            description = client.describe_collection(name, timeout=timeout)
            self._check_existing(description)
            partition_key = any(f.get("is_partition_key") for f in description["fields"])
            indexes = client.list_indexes(name, field_name="embedding", timeout=timeout)
            if indexes:
                index_type = str(
                    client.describe_index(name, index_name=indexes[0], timeout=timeout).get("index_type", "")
                )
            else:
                index_type, build = index_for(self.backend, self._settings.index_type)
                client.create_index(name, self._index_params(index_type, build), timeout=timeout)
            # Loading an already loaded collection is a no-op on both back-ends.
            client.load_collection(name, timeout=_OPEN_DEADLINE_S)
            # After a server restart "loaded" is reported at once while the query nodes still
            # recover (measured: 2-30 s): wait here, with a long timeout, not in the first request.
            client.query(
                name,
                filter='example_id == ""',
                output_fields=["example_id"],
                limit=1,
                consistency_level="Strong",
                timeout=_OPEN_DEADLINE_S,
            )
        else:
            partition_key = partition_key_safe(version)
            index_type, build = index_for(self.backend, self._settings.index_type)
            extra: dict[str, Any] = {"num_partitions": _NUM_PARTITIONS} if partition_key else {}
            client.create_collection(
                name,
                schema=build_schema(self.dimension, partition_key),
                index_params=self._index_params(index_type, build),
                consistency_level=self._settings.consistency_level,
                timeout=_OPEN_DEADLINE_S,
                **extra,
            )
        backend: Literal["server", "lite"] = self.backend
        return _Capabilities(backend, version, index_type, partition_key)

    def _index_params(self, index_type: str, build: dict[str, Any]) -> Any:
        params = MilvusClient.prepare_index_params()
        params.add_index("embedding", index_type=index_type, metric_type="COSINE", params=build)
        return params

    def _check_existing(self, description: dict[str, Any]) -> None:
        fields = {f["name"]: f for f in description["fields"]}
        missing = [name for name in ALL_FIELDS if name not in fields]
        if missing:
            raise ValueError(
                f"collection {self.collection!r} at {self.uri} exists with another schema (missing fields "
                f"{missing}); drop it or set milvus.collection to a new name"
            )
        dim = int(fields["embedding"].get("params", {}).get("dim", 0))
        if dim != self.dimension:
            raise ValueError(
                f"collection {self.collection!r} at {self.uri} holds {dim}-d vectors but milvus.dimension is "
                f"{self.dimension}; use another collection name or rebuild it (`echolm rebuild`)"
            )
