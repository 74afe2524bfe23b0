"""Helpers for the fault, isolation and fuzz tests: emulated and real dev TGI backends the tests own
(so a test can kill, freeze or restart them without touching the session stack), workers started
concurrently, reply collection, and whole-topic reads.

Nothing here starts anything at import; every process started is stopped by the caller's context
manager or by ``Pipeline.stop`` (workers are appended to ``pipeline.workers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson

from devstack.localstack import LocalStack, create_topics, free_port
from devstack.tgi_dev.process import DevServerProcess
from devstack.workers import WorkerProcess
from echolm.bank import read_topic as read_topic_values
from echolm.client import EchoClient, Reply
from infra.settings import BackendSettings, Settings, load_settings
from streams.topology import topic_specs
from tests.fakes import ASSUMED_PRIORS

from .conftest import Pipeline

__all__ = [
    "FAST",
    "OwnedBackend",
    "backends_section",
    "collect_replies",
    "crash_report",
    "make_pipeline",
    "owned_backends",
    "per_id",
    "read_topic",
    "shutdown_counts",
    "start_workers",
    "worker_pid",
]

_GENERATION_LINE = re.compile(r"generation request \S+ (\".*\")$", re.MULTILINE)

# A fast emulated backend: about 2 ms to first token, 1 ms per further token.
FAST = {"prefill_ms_per_token": 0.1, "decode_ms_per_token": 1.0, "batch_slowdown": 0.0}


@dataclass
class OwnedBackend:
    """One dev TGI server a test owns, on a fixed port so it can be restarted in place."""

    name: str
    tier: str
    engine: Literal["llama", "emulated"] = "emulated"
    service: dict[str, float] = field(default_factory=lambda: dict(FAST))
    max_concurrent_requests: int = 128
    max_batch_size: int = 8
    cost: float = 1.0
    quality_prior: float = 0.5
    log_requests: bool = False  # the server logs each generation request (``generations`` counts them)
    log_dir: Path = Path()
    port: int = field(default_factory=free_port)
    server: DevServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> BackendSettings:
        return BackendSettings(
            name=self.name, url=self.url, tier=self.tier, cost=self.cost, quality_prior=self.quality_prior
        )

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"tgi-{self.name}.log"

    def generations(self) -> Counter[str]:
        """How many generation requests this server accepted, per last user turn (``log_requests``)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return Counter(json.loads(m[1]) for m in _GENERATION_LINE.finditer(text))

    def _process(self) -> DevServerProcess:
        args: list[str] = []
        if self.engine == "emulated":
            for key, value in self.service.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
        if self.log_requests:
            args.append("--log-requests")
        return DevServerProcess(
            port=self.port,
            engine=self.engine,
            model_id=f"{self.tier}:{self.name}",
            max_concurrent_requests=self.max_concurrent_requests,
            max_batch_size=self.max_batch_size if self.engine == "emulated" else 1,
            extra_args=args,
            log_path=self.log_path,
        )

    async def start(self) -> None:
        if self.server is not None and self.server.running:
            return
        # A server killed a moment ago may leave its port in TIME_WAIT; the dev server binds with
        # SO_REUSEADDR, so restarting on the same port works at once.
        self.server = self._process()
        self.server.start(wait=False)
        await self.server.wait_ready_async()

    async def failures(self, error_type: str) -> float:
        """The server's ``tgi_request_failure{err=...}`` counter (``overloaded`` counts its 429s)."""
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"{self.url}/metrics")).text
        needle = f'tgi_request_failure{{err="{error_type}"}} '
        return sum(float(line[len(needle) :]) for line in text.splitlines() if line.startswith(needle))

    async def restart(self) -> None:
        """Stop (if running) and start again on the same port, with the current fields."""
        await self.stop()
        self.server = None
        await self.start()

    def kill(self) -> None:
        """SIGKILL: the process dies at once, connections are reset."""
        if self.server is not None and self.server.pid is not None and self.server.running:
            os.kill(self.server.pid, signal.SIGKILL)
            self.server.stop()  # reaps it

    def freeze(self) -> None:
        """SIGSTOP: the process stops answering anything (a GC pause, a frozen VM) but keeps its port."""
        assert self.server is not None and self.server.pid is not None
        os.kill(self.server.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.server is not None and self.server.pid is not None
        os.kill(self.server.pid, signal.SIGCONT)

    async def stop(self) -> None:
        if self.server is not None and self.server.running:
            with contextlib.suppress(ProcessLookupError):
                if self.server.pid is not None:
                    os.kill(self.server.pid, signal.SIGCONT)  # a frozen server cannot handle SIGTERM
        if self.server is not None:
            await self.server.astop()


@contextlib.asynccontextmanager
async def owned_backends(backends: Sequence[OwnedBackend], log_dir: Path) -> AsyncIterator[None]:
    for backend in backends:
        backend.log_dir = log_dir
    try:
        await asyncio.gather(*(b.start() for b in backends))
        yield
    finally:
        await asyncio.gather(*(b.stop() for b in backends), return_exceptions=True)


async def make_pipeline(
    stack: LocalStack,
    log_dir: Path,
    *,
    bootstrap_servers: str | None = None,
    milvus_uri: str | None = None,
    **sections: dict[str, Any],
) -> Pipeline:
    """What ``pipeline_factory`` builds (unique topics, group and collection), for fixtures of a wider
    scope than a function and for tests with their own broker or Milvus server; no workers yet
    (``start_workers``)."""
    tag = uuid.uuid4().hex[:8]
    overrides: dict[str, Any] = {
        "kafka": {"topic_prefix": f"t{tag}"},
        "milvus": {"collection": f"c{tag}"},
        "worker": {"app_id": f"g{tag}", "metrics_port": 0, "data_dir": str(log_dir / "worker")},
        "replay": {"interval_s": 1.0},
        "routing": {"priors_file": str(ASSUMED_PRIORS)},
    }
    for section, values in sections.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    settings = stack.apply(load_settings(**overrides))
    update: dict[str, Any] = {}
    if bootstrap_servers is not None:
        update["kafka"] = settings.kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
    if milvus_uri is not None:
        update["milvus"] = settings.milvus.model_copy(update={"uri": milvus_uri})
    settings = settings.model_copy(update=update)
    await create_topics(settings.kafka.bootstrap_servers, topic_specs(settings))
    return Pipeline(settings=settings, log_dir=log_dir)


def backends_section(backends: Iterable[OwnedBackend | BackendSettings], **tgi: Any) -> dict[str, Any]:
    """The ``tgi`` settings section for ``pipeline_factory`` with these backends."""
    views = [b.settings() if isinstance(b, OwnedBackend) else b for b in backends]
    return {"backends": [b.model_dump(mode="json") for b in views], **tgi}


async def start_workers(
    pipeline: Pipeline, n: int, *, kafka: Mapping[str, Any] | None = None, **worker: Any
) -> list[WorkerProcess]:
    """Start ``n`` workers at once (each loads the embedding model: about 10 s on 2 cores), with
    ``kafka`` and ``worker`` settings changed for these workers only."""
    settings = pipeline.settings
    if worker:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=worker)})
    if kafka:
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update=dict(kafka))})
    started = []
    for _ in range(n):
        index = len(pipeline.workers)
        proc = WorkerProcess(
            settings, log_path=pipeline.log_dir / f"worker-{index}.log", name=f"worker-{index}"
        )
        proc.start()
        pipeline.workers.append(proc)
        started.append(proc)
    await asyncio.gather(*(p.wait_ready() for p in started))
    return started


def crash_report(workers: Iterable[WorkerProcess]) -> str:
    """Agent crashes and tracebacks in the workers' logs (for assertion messages)."""
    lines = []
    for worker in workers:
        text = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
        hits = [
            line for line in text.splitlines() if "Crashed reason" in line or line.startswith("Traceback")
        ]
        lines.append(f"{worker.name} (pid {worker.pid}, running={worker.running}): {hits[:5]}")
    return "; ".join(lines)


def worker_pid(reply: Reply) -> int:
    """The pid part of ``Reply.worker`` (``host:pid``)."""
    return int(reply.worker.rsplit(":", 1)[1])


async def collect_replies(
    client: EchoClient, expected: set[str], *, timeout_s: float, into: dict[str, Reply] | None = None
) -> dict[str, Reply]:
    """Replies to ``expected`` (sent with ``send``) until all arrived or ``timeout_s`` passed."""
    got = into if into is not None else {}
    deadline = time.monotonic() + timeout_s
    while not expected <= got.keys():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        async for reply in client.replies(timeout=min(left, 1.0)):
            got[reply.request_id] = reply
            if expected <= got.keys():
                break
    return got


async def read_topic(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every value on ``topic`` now, JSON-decoded, partition by partition."""
    return [orjson.loads(value) for value in await read_topic_values(settings, topic)]


def per_id(values: Iterable[dict[str, Any]], key: str = "request_id") -> Counter[str]:
    return Counter(str(v.get(key, "")) for v in values)


_SHUTDOWN = re.compile(r"shutdown on SIG\w+: (\d+) in flight at signal, (\d+) drained, (\d+) abandoned")


def shutdown_counts(log_text: str) -> tuple[int, int, int] | None:
    """(in flight, drained, abandoned) from a worker's graceful-shutdown log line."""
    match = _SHUTDOWN.search(log_text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None
