"""Fleet-scale benchmark without a fleet: echolm and its baselines on one stream, in one run.

    echolm bench fleet --preset small          # about 12 minutes on 2 cores
    echolm bench fleet --preset full           # longer streams; see docs/benchmarks.md

What is real and what is emulated:

* **Real**: the Tansu Kafka broker, the embedded Milvus server, MiniLM embeddings, the echolm worker
  (prepare/serve/admit/learn agents, selector, LinUCB router with the live queue-depth load term,
  TGI adapter and queue probe), ``EchoClient``, the baselines' dispatch and semantic cache, and
  every latency and throughput figure, measured end to end on this machine.
* **Emulated**: the GPU backends. Each replica is a dev TGI server on the emulated engine
  (``infra/tgi_emulator.py``: continuous batching, ``tgi_queue_size``/``tgi_batch_current_size``
  gauges, the real wire protocol) whose prefill/decode/batch-slowdown numbers come from H100
  measurements of 1B and 8B Llama-shaped decoders (``bench/gpu_calibrate.py``, calibration.json),
  times ``time_scale``. Replies are filler text.
* **Modelled**: quality. Each reply's win rate against the large model is looked up from the serving
  condition (``bench.calibrate.QualityModel``): large tier, small tier alone, small tier with a
  rewording of the request among its examples, with unrelated examples only, a semantic-cache hit on
  a rewording or on another question. The conditions are measured per request (from echolm's log
  topic, or the cache's hit); the table is the model.

Equal hardware: every system gets ``slots`` emulated GPUs. Large-only: all large; small-only: all
small; semantic cache: all large (misses); echolm and the load-blind router: ``echolm_small`` small
and the rest large. Each system serves the same two phases of one seeded workload
(``bench/workloads.py``): **burst** (bursty arrivals, latency and quality) and **saturation** (the
continuation of the stream, all sent within ``saturation_window_s``: completions per second is the
system's capacity). Systems run one after another on the same broker, Milvus and backends, each with
its own topics, collection (seeded with the same bank) and fresh worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import (
    DirectDispatcher,
    Scheduled,
    SemanticCache,
    open_loop,
    serve_direct,
    serve_semantic_cache,
    simulate_semantic_cache,
)
from bench.calibrate import (
    ASSUMED_QUALITY,
    RESULTS_DIR,
    Condition,
    QualityModel,
    TierService,
    load_calibration,
    quality_model_from_selection,
)
from bench.report import (
    RequestResult,
    headline,
    quality_sensitivity,
    requality,
    summaries_to_json,
    summarize,
)

__all__ = [
    "PRESETS",
    "PRIMARY_QUALITY",
    "SYSTEMS",
    "FleetPreset",
    "condition_of",
    "offline_quality_model",
    "run_fleet",
    "token_lengths",
]

PLOTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "plots"

# The table the fleet scores with: the assumed, paper-shaped cells, except ``small_match``, which is the
# paper's own measured number (Gemma-2-2B shown examples against Gemma-2-27B on MS MARCO: win rate 0.56;
# /work/shared/ECHOLM.md). Still a model: the conditions are measured, the table is not.
PRIMARY_QUALITY = replace(
    ASSUMED_QUALITY,
    small_match=0.56,
    sources={
        **ASSUMED_QUALITY.sources,
        "small_match": "PAPER: small model with examples vs a ~10x larger one, MS MARCO (win rate 0.56)",
    },
)
SYSTEMS = ("large-only", "small-only", "semantic-cache", "echolm-load-blind", "echolm")
TENANT = "bench"
SMALL, LARGE = "small", "large"
FLEET_COST_WEIGHT = 0.05  # routing.cost_weight on the fleet's win-rate quality scale


@dataclass(frozen=True, slots=True)
class FleetPreset:
    name: str
    small_model: str = "1B"
    large_model: str = "8B"
    slots: int = 4  # emulated GPUs per system
    echolm_small: int = 2  # of which small-tier replicas for echolm and the load-blind router
    max_batch_size: int = 8  # sequences a replica runs at once (continuous batching)
    time_scale: float = 4.0  # emulated service times x this (1 = the H100 measurements)
    groups: int = 120  # contradish paraphrase groups in the workload
    bank_fraction: float = 0.5
    novel_group_fraction: float = 0.3  # groups with no entry in the bank: requests no cache can help
    zipf_s: float = 0.8
    burst_requests: int = 300
    burst_rate_rps: float = 8.0
    burst_peak: float = 2.5
    burst_fraction: float = 0.25
    burst_mean_s: float = 4.0
    saturation_requests: int = 120
    saturation_window_s: float = 2.0
    tokens_median: int = 160
    tokens_sigma: float = 0.5
    semantic_threshold: float = 0.8
    # Share of echolm replies rated back (Bernoulli(win rate) thumbs). 0: the router keeps its priors,
    # which makes runs repeatable; with 0.2, two runs routed very differently (docs/benchmarks.md).
    feedback_rate: float = 0.0
    worker_concurrency: int = 128
    drain_timeout_s: float = 120.0
    timeline_bin_s: float = 5.0
    systems: tuple[str, ...] = SYSTEMS
    seed: int = 0
    training_groups: int = 100  # other groups, for the offline-trained utility model (train_utility)
    # routing.load_q0; None keeps the default (2 waiting requests, routing.load_signal = "waiting").
    # Earlier runs set 8 when the penalty read waiting + running (docs/benchmarks.md).
    load_q0: float | None = None
    trained_utility: bool = True  # False: the untrained default utility model and threshold
    # "assumed": PRIMARY_QUALITY (calibrate.ASSUMED_QUALITY with the paper's measured small_match);
    # "offline": bench/selection_quality.py's SmolLM2-vs-its-best-of-n measurement. The other one is
    # always reported as a what-if, and report.quality_sensitivity re-scores small_match.
    quality_source: str = "assumed"

    @property
    def echolm_large(self) -> int:
        return self.slots - self.echolm_small


PRESETS: dict[str, FleetPreset] = {
    "small": FleetPreset(name="small"),
    # A two-minute shake-out of the whole path (not for quoting).
    "smoke": FleetPreset(
        name="smoke", groups=30, burst_requests=60, saturation_requests=40, drain_timeout_s=60
    ),
    # About 35 minutes: four times the stream, every group. Run it where it may take the machine.
    "full": FleetPreset(name="full", groups=400, burst_requests=1200, saturation_requests=400),
}


# ------------------------------------------------------------------------------------------ pure parts
def condition_of(
    *, tier: str, large_tier: str, example_ids: Sequence[str], group_of: Mapping[str, str], group: str
) -> Condition:
    """The quality condition of one echolm reply: the tier, and whether a rewording of the request
    (same paraphrase group) was among the examples the small tier was shown."""
    if tier == large_tier:
        return "large"
    if not example_ids:
        return "small_alone"
    if any(group_of.get(e) == group for e in example_ids):
        return "small_match"
    return "small_related"


def token_lengths(
    n: int, *, median: int, sigma: float, seed: int, low: int = 16, high: int = 512
) -> list[int]:
    """Seeded log-normal answer lengths (``max_new_tokens`` per request), the same for every system."""
    rng = np.random.default_rng([seed, 7])
    values = np.exp(rng.normal(math.log(median), sigma, size=n))
    return [int(v) for v in np.clip(np.round(values), low, high)]


def bank_answer(text: str, tokens: int) -> str:
    """A stand-in large-model answer of about ``tokens`` tokens (4 characters each, as the emulator
    counts them)."""
    head = f"Answer to: {text.strip()} "
    body = " the answer to this request takes some words" * (tokens * 4 // 44 + 1)
    return (head + body)[: max(len(head), tokens * 4)]


# -------------------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = math.nan
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "commit": commit,
        "loadavg": os.getloadavg(),
    }


# ----------------------------------------------------------------------------------------------- fleet
class Fleet:
    """The shared machinery: broker, Milvus, and the emulated replicas of both tiers."""

    def __init__(
        self,
        preset: FleetPreset,
        services: Mapping[str, TierService],
        data_dir: Path,
        say: Callable[[str], None],
    ) -> None:
        self.preset = preset
        self.small = services[preset.small_model]
        self.large = services[preset.large_model]
        self.data_dir = data_dir
        self.say = say
        self.stack: Any = None
        self.servers: dict[str, Any] = {}

    async def __aenter__(self) -> Fleet:
        from devstack.localstack import LocalStack
        from devstack.tgi_dev import DevServerProcess
        from infra.settings import load_settings

        base = load_settings(stack={"data_dir": str(self.data_dir)})
        self.stack = LocalStack(
            base, milvus="server", backends=False, ephemeral=True, data_dir=self.data_dir, progress=self.say
        )
        await self.stack.start()
        p = self.preset
        n_small = max(p.slots if "small-only" in p.systems else 0, p.echolm_small)
        n_large = max(p.slots if {"large-only", "semantic-cache"} & set(p.systems) else 0, p.echolm_large)
        for tier, service, count in ((SMALL, self.small, n_small), (LARGE, self.large, n_large)):
            for i in range(count):
                name = f"{tier}-{i}"
                self.servers[name] = DevServerProcess(
                    port=0,
                    engine="emulated",
                    model_id=f"{service.name}:{name}",
                    ctx=16384,
                    max_batch_size=p.max_batch_size,
                    max_concurrent_requests=100_000,
                    extra_args=[*service.emulator_args(p.time_scale), "--log-level", "WARNING"],
                    log_path=self.data_dir / f"tgi-{name}.log",
                )
        self.say(
            f"starting {n_small} small ({self.small.name}) and {n_large} large ({self.large.name}) "
            "emulated replicas"
        )
        for server in self.servers.values():
            server.start(wait=False)
        await asyncio.gather(*(s.wait_ready_async() for s in self.servers.values()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                await server.astop()
        if self.stack is not None:
            await self.stack.stop()

    def backends(self, system: str) -> list[Any]:
        from infra.settings import BackendSettings

        p = self.preset
        if system == "large-only" or system == "semantic-cache":
            wanted = [f"{LARGE}-{i}" for i in range(p.slots)]
        elif system == "small-only":
            wanted = [f"{SMALL}-{i}" for i in range(p.slots)]
        else:
            wanted = [f"{SMALL}-{i}" for i in range(p.echolm_small)] + [
                f"{LARGE}-{i}" for i in range(p.echolm_large)
            ]
        cost = {SMALL: 1.0, LARGE: self.large.decode_ms_per_token / self.small.decode_ms_per_token}
        return [
            BackendSettings(
                name=name,
                url=self.servers[name].url,
                tier=name.split("-")[0],
                cost=round(cost[name.split("-")[0]], 3),
                quality_prior=0.5,
                max_concurrency=256,
            )
            for name in wanted
        ]

    def settings(
        self,
        system: str,
        quality: QualityModel,
        *,
        load_lambda: float | None = None,
        utility_model_path: Path | None = None,
    ) -> Any:
        from infra.settings import load_settings

        tag = uuid.uuid4().hex[:8]
        backends = [
            b.model_copy(update={"quality_prior": quality.small_alone if b.tier == SMALL else quality.large})
            for b in self.backends(system)
        ]
        # Quality here is on the win-rate scale (small alone 0.3, large 0.5: a gap of 0.2, against 0.35
        # for the local defaults), so the cost tie-break stays at 0.05, a quarter of the gap, as in the
        # published run (docs/benchmarks.md, "echolm's configuration for this fleet").
        routing: dict[str, Any] = {"cost_weight": FLEET_COST_WEIGHT}
        if load_lambda is not None:
            routing["load_lambda"] = load_lambda
        if self.preset.load_q0 is not None:
            routing["load_q0"] = self.preset.load_q0
        selection: dict[str, Any] = {}
        if utility_model_path is not None:
            selection["utility_model_path"] = str(utility_model_path)
        settings = load_settings(
            kafka={"topic_prefix": f"bench{tag}", "partitions": 4},
            milvus={"collection": f"bench_{tag}"},
            worker={
                "app_id": f"bench-{tag}",
                "metrics_port": 0,
                "web_port": 0,
                "data_dir": str(self.data_dir / f"worker-{tag}"),
                "concurrency": self.preset.worker_concurrency,
            },
            tgi={
                "backends": [b.model_dump(mode="json") for b in backends],
                # small-only has no large tier; its dispatcher ignores this
                "large_tier": LARGE if any(b.tier == LARGE for b in backends) else SMALL,
            },
            routing=routing,
            selection=selection,
            replay={"enabled": False},
            # One torch thread per encode: two on this shared 2-core host ran 5-9x slower under load
            # (OpenMP threads spinning against other processes; docs/benchmarks.md).
            embedding={"threads": 2},
            stack={"data_dir": str(self.data_dir)},
        )
        return self.stack.apply(settings)


# ------------------------------------------------------------------------------------------- sampling
class DepthSampler:
    """Scrapes every backend's queue gauges every ``interval_s`` while a phase runs."""

    def __init__(self, backends: Sequence[Any], interval_s: float = 0.5) -> None:
        self.backends = list(backends)
        self.interval_s = interval_s
        self.rows: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self, clock: Callable[[], float]) -> None:
        import httpx

        from infra.tgi import parse_queue_gauges

        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                for b in self.backends:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        waiting, running = parse_queue_gauges((await client.get(f"{b.url}/metrics")).text)
                        self.rows.append(
                            {
                                "t_s": round(clock(), 3),
                                "backend": b.name,
                                "tier": b.tier,
                                "waiting": waiting,
                                "running": running,
                            }
                        )
                await asyncio.sleep(self.interval_s)

    def start(self, clock: Callable[[], float]) -> None:
        self._task = asyncio.create_task(self._run(clock))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ------------------------------------------------------------------------------------------------ bank
async def seed_bank(settings: Any, bank: Sequence[tuple[str, str]], vectors: np.ndarray, tokens: int) -> int:
    """Write the bank (request text, group) with stand-in large answers into this system's collection."""
    from agents.policy.admission import example_id
    from infra.milvus import MilvusExampleStore
    from infra.protocols import Example

    now = time.time()
    examples = [
        Example(
            example_id=example_id(TENANT, text),
            tenant=TENANT,
            request=text,
            response=bank_answer(text, tokens),
            embedding=vectors[i].astype(np.float32),
            model_tier=LARGE,
            quality=0.5,
            created_at=now,
            updated_at=now,
        )
        for i, (text, _group) in enumerate(bank)
    ]
    async with MilvusExampleStore(settings.milvus) as store:
        for i in range(0, len(examples), 256):
            await store.upsert(examples[i : i + 256])
        return await store.count(TENANT)


# ----------------------------------------------------------------------------------------------- echolm
class LogWatcher:
    """Reads echolm's log topic while a system runs: per request id, the tier and example ids used."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.seen: dict[str, tuple[str, list[str]]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LogWatcher:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from infra.kafka import kafka_consumer_kwargs

        topic = self.settings.topic("log")
        self._consumer = AIOKafkaConsumer(
            **kafka_consumer_kwargs(self.settings),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(topic) or set()
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        import orjson

        async for message in self._consumer:
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                data = orjson.loads(message.value)
                if data.get("origin", "serve") != "serve":
                    continue
                rid = data["request"]["request_id"]
                self.seen[rid] = (
                    str(data["reply"]["tier"]),
                    [str(e["example_id"]) for e in data.get("examples") or []],
                )
                self._events.setdefault(rid, asyncio.Event()).set()

    async def wait(self, request_id: str, timeout_s: float) -> tuple[str, list[str]] | None:
        event = self._events.setdefault(request_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
        return self.seen.get(request_id)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def serve_echolm(
    client: Any,
    watcher: LogWatcher,
    *,
    system: str,
    phase: str,
    quality: QualityModel,
    group_of: Mapping[str, str],
    feedback_rate: float,
    rng: np.random.Generator,
    timeout_s: float,
) -> Callable[[Scheduled, Callable[[], float]], Any]:
    from infra.errors import ClientTimeout

    async def handle(item: Scheduled, clock: Callable[[], float]) -> RequestResult:
        sent = clock()
        try:
            reply = await client.ask(
                item.text,
                tenant=TENANT,
                timeout=timeout_s,
                request_id=item.request_id,
                max_new_tokens=item.max_new_tokens,
            )
        except ClientTimeout:
            reply = None
        done = clock()
        failed = RequestResult(
            system=system,
            phase=phase,
            request_id=item.request_id,
            group_id=item.group_id,
            arrival_s=item.at,
            sent_s=sent,
            done_s=None,
            ok=False,
        )
        if reply is None or not reply.ok:
            return failed
        logged = await watcher.wait(item.request_id, timeout_s=10.0)
        example_ids = logged[1] if logged is not None else (["?"] * reply.n_examples)
        condition = condition_of(
            tier=reply.tier,
            large_tier=LARGE,
            example_ids=example_ids if reply.tier != LARGE else [],
            group_of=group_of,
            group=item.group_id,
        )
        q = quality.quality(condition)
        if feedback_rate > 0 and rng.random() < feedback_rate:
            await client.feedback(item.request_id, float(rng.random() < q), tenant=TENANT)
        generate = reply.timings_ms.get("generate")
        return replace(
            failed,
            done_s=done,
            ok=True,
            tier=reply.tier,
            backend=reply.backend,
            n_examples=reply.n_examples,
            condition=condition,
            quality=q,
            generate_ms=float(generate) if generate is not None else None,
            stages_ms={k: float(v) for k, v in reply.timings_ms.items() if isinstance(v, int | float)},
        )

    return handle


# ----------------------------------------------------------------------------------------------- runner
async def train_utility(
    preset: FleetPreset, embedder: Any, exclude_groups: frozenset[str], out: Path
) -> dict[str, Any]:
    """Fit echolm's stage-2 utility model offline, as the paper does, on groups the benchmark never serves.

    ``training_groups`` other contradish groups are split like the workload; every live request's top
    ``selection.top_k`` bank neighbours become (features, label) rows with ``candidate_features``, the
    selector's own features, labelled 1 when the candidate is a rewording of the request: under the
    quality model that is exactly when an example helps (``small_match`` > ``small_alone`` >
    ``small_related``). ``UtilityModel.fit`` and ``ThresholdTuner`` are the product's own; the result
    is written where ``selection.utility_model_path`` points the worker.
    """
    from agents.policy.features import candidate_features
    from agents.policy.retrieval import ThresholdTuner, UtilityModel
    from bench.workloads import load_contradish_groups, sample_groups, split_groups
    from infra.protocols import Example, SearchHit
    from infra.settings import SelectionSettings

    pool = [g for g in load_contradish_groups() if g.group_id not in exclude_groups]
    chosen = set(
        sample_groups([g.group_id for g in pool], min(preset.training_groups, len(pool)), seed=preset.seed)
    )
    split = split_groups(
        [g for g in pool if g.group_id in chosen], bank_fraction=preset.bank_fraction, seed=preset.seed
    )
    bank_vectors = np.asarray(await embedder.embed([r.text for r in split.bank]), dtype=np.float64)
    live_vectors = np.asarray(await embedder.embed([r.text for r in split.live]), dtype=np.float64)
    now = time.time()
    examples = [
        Example(
            example_id=r.request_id,
            tenant=TENANT,
            request=r.text,
            response=bank_answer(r.text, preset.tokens_median),
            embedding=bank_vectors[i].astype(np.float32),
            created_at=now,
            updated_at=now,
        )
        for i, r in enumerate(split.bank)
    ]
    top_k = SelectionSettings().top_k
    rows, labels = [], []
    for i, request in enumerate(split.live):
        sims = bank_vectors @ live_vectors[i]
        for j in np.argsort(-sims)[:top_k]:
            hit = SearchHit(examples[j], float(sims[j]))
            rows.append(
                candidate_features(
                    live_vectors[i].astype(np.float32), request.text, hit, target_tier=SMALL, now=now
                )
            )
            labels.append(float(split.bank[j].group_id == request.group_id))
    x, y = np.vstack(rows), np.asarray(labels)
    model = UtilityModel.default().fit(x, y)
    tuner = ThresholdTuner(threshold=SelectionSettings().utility_threshold)
    for u, good in zip(model.predict(x), y, strict=True):
        tuner.observe(float(u), bool(good))
    for _ in range(50):
        before = tuner.threshold
        if tuner.tune() == before:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model.to_dict(), "threshold": tuner.threshold}))  # noqa: ASYNC240 - once
    predicted = model.predict(x) >= tuner.threshold
    return {
        "groups": len(chosen),
        "rows": len(y),
        "positive_rate": float(y.mean()),
        "threshold": tuner.threshold,
        "precision": float(y[predicted].mean()) if predicted.any() else math.nan,
        "recall": float(predicted[y == 1].mean()) if (y == 1).any() else math.nan,
        "untrained_recall_at_0.5": float((UtilityModel.default().predict(x)[y == 1] >= 0.5).mean()),
    }


@dataclass
class Workbench:
    """The workload, turned into what every system gets: bank rows, and one schedule per phase."""

    bank: list[tuple[str, str]]
    phases: dict[str, list[Scheduled]]
    group_of: dict[str, str]  # example id -> group, for every text of the workload
    description: dict[str, str] = field(default_factory=dict)
    groups: frozenset[str] = frozenset()


def build_workbench(preset: FleetPreset) -> Workbench:
    from agents.policy.admission import example_id
    from bench.workloads import WorkloadConfig, build_workload, load_contradish_groups, sample_groups

    groups = load_contradish_groups()
    chosen = set(
        sample_groups([g.group_id for g in groups], min(preset.groups, len(groups)), seed=preset.seed)
    )
    groups = [g for g in groups if g.group_id in chosen]
    n = preset.burst_requests + preset.saturation_requests
    config = WorkloadConfig(
        seed=preset.seed,
        n_requests=n,
        rate_rps=preset.burst_rate_rps,
        process="bursty",
        zipf_s=preset.zipf_s,
        bank_fraction=preset.bank_fraction,
        novel_group_fraction=preset.novel_group_fraction,
        burst_peak=preset.burst_peak,
        burst_fraction=preset.burst_fraction,
        burst_mean_s=preset.burst_mean_s,
    )
    workload = build_workload(groups, config)
    tokens = token_lengths(n, median=preset.tokens_median, sigma=preset.tokens_sigma, seed=preset.seed)
    burst = [
        Scheduled(f"burst-{i:05d}", a.request.group_id, a.request.text, a.at, tokens[i])
        for i, a in enumerate(workload.arrivals[: preset.burst_requests])
    ]
    step = preset.saturation_window_s / max(preset.saturation_requests, 1)
    saturation = [
        Scheduled(
            f"sat-{i:05d}", a.request.group_id, a.request.text, i * step, tokens[preset.burst_requests + i]
        )
        for i, a in enumerate(workload.arrivals[preset.burst_requests :])
    ]
    group_of = {example_id(TENANT, t): g.group_id for g in groups for t in g.texts}
    return Workbench(
        groups=frozenset(chosen),
        bank=[(r.text, r.group_id) for r in workload.bank],
        phases={"burst": burst, "saturation": saturation},
        group_of=group_of,
        description={
            "burst": f"{len(burst)} requests, bursty arrivals (mean {preset.burst_rate_rps:g} req/s, peaks "
            f"{preset.burst_peak:g}x for {preset.burst_fraction:.0%} of the time)",
            "saturation": f"the next {len(saturation)} requests of the stream, all sent within "
            f"{preset.saturation_window_s:g} s: completions/s is capacity",
        },
    )


def _phase_clock(loop: asyncio.AbstractEventLoop, lead_s: float = 0.2) -> Callable[[], float]:
    """Seconds since a phase starts (``open_loop`` starts its clock ``lead_s`` from now too)."""
    t0 = loop.time() + lead_s

    def clock() -> float:
        return loop.time() - t0

    return clock


async def _run_system(
    system: str,
    fleet: Fleet,
    bench: Workbench,
    bank_vectors: np.ndarray,
    quality: QualityModel,
    *,
    embedder: Any,
    say: Callable[[str], None],
    bar: Callable[[str, int], Any],
    utility_model_path: Path | None = None,
) -> tuple[list[RequestResult], list[dict[str, Any]], dict[str, Any]]:
    """Both phases of one system; returns records, queue-depth samples and facts about the run."""
    from devstack.localstack import create_topics
    from streams.topology import topic_specs

    p = fleet.preset
    records: list[RequestResult] = []
    depths: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    began = time.monotonic()
    lam = 0.0 if system == "echolm-load-blind" else None
    is_echolm = system.startswith("echolm")
    settings = fleet.settings(
        system, quality, load_lambda=lam, utility_model_path=utility_model_path if is_echolm else None
    )
    backends = list(settings.tgi.backends)
    facts["backends"] = {b.name: b.tier for b in backends}
    timeout = p.drain_timeout_s
    rng = np.random.default_rng([p.seed, 11])

    async def phases(make_handler: Callable[[str], Any]) -> None:
        for phase, schedule in bench.phases.items():
            sampler = DepthSampler(backends)
            sampler.start(_phase_clock(asyncio.get_running_loop()))
            progress = bar(f"{system} {phase}", len(schedule))
            try:
                out = await open_loop(
                    schedule,
                    make_handler(phase),
                    system=system,
                    phase=phase,
                    timeout_s=timeout,
                    progress=progress.update,
                )
            finally:
                progress.close()
                await sampler.stop()
            records.extend(out)
            depths.extend({"system": system, "phase": phase, **row} for row in sampler.rows)
            ok = sum(r.ok for r in out)
            say(f"{system} {phase}: {ok}/{len(out)} answered")

    if is_echolm or system == "semantic-cache":
        await create_topics(settings.kafka.bootstrap_servers, topic_specs(settings))
        count = await seed_bank(settings, bench.bank, bank_vectors, p.tokens_median)
        facts["bank_examples"] = count
    if is_echolm:
        from devstack.workers import WorkerProcess
        from echolm.client import EchoClient

        worker = WorkerProcess(settings, log_path=fleet.data_dir / f"worker-{system}.log", name=system)
        worker.start()
        try:
            await worker.wait_ready(timeout_s=240)
            facts["worker_ready_s"] = time.monotonic() - began
            async with EchoClient(settings) as client, LogWatcher(settings) as watcher:
                for i in range(3):
                    await client.ask(f"warm-up question {i}?", tenant="warmup", timeout=60, max_new_tokens=4)
                await phases(
                    lambda phase: serve_echolm(
                        client,
                        watcher,
                        system=system,
                        phase=phase,
                        quality=quality,
                        group_of=bench.group_of,
                        feedback_rate=p.feedback_rate,
                        rng=rng,
                        timeout_s=timeout,
                    )
                )
                facts["client_duplicates"] = client.duplicates
        finally:
            facts["worker_exit"] = await worker.stop(timeout_s=20)
    else:
        from infra.milvus import MilvusExampleStore

        tier = SMALL if system == "small-only" else LARGE
        async with DirectDispatcher([b for b in backends if b.tier == tier], settings.tgi) as dispatcher:
            for _ in range(3):
                await dispatcher.generate("warm-up question?", 4)
            if system == "semantic-cache":
                async with MilvusExampleStore(settings.milvus) as store:
                    cache = SemanticCache(
                        store=store,
                        embedder=embedder,
                        tenant=TENANT,
                        threshold=p.semantic_threshold,
                        group_of=bench.group_of,
                    )
                    await cache.lookup("warm-up question?")
                    await phases(
                        lambda phase: serve_semantic_cache(
                            cache, dispatcher, system=system, phase=phase, quality=quality
                        )
                    )
                    facts["cache_hit_rate_live"] = cache.hits / max(cache.lookups - 1, 1)
            else:
                await phases(
                    lambda phase: serve_direct(
                        dispatcher, system=system, phase=phase, quality=quality, large_tier=LARGE
                    )
                )
    facts["wall_s"] = time.monotonic() - began
    facts["loadavg_after"] = os.getloadavg()
    return records, depths, facts


def offline_quality_model(fallback: QualityModel, results_dir: Path = RESULTS_DIR) -> QualityModel:
    """The offline-measured table (``calibrate.load_quality_model``'s files), its thin cells filled from
    ``fallback`` (the primary table) rather than from ``ASSUMED_QUALITY``; ``fallback`` if none exists."""
    for name in ("selection-quality-full.json", "selection-quality-small.json"):
        path = results_dir / name
        if path.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                model, _ = quality_model_from_selection(
                    json.loads(path.read_text()), name=path.name, fallback=fallback
                )
                return model
    return fallback


def _load_overhead() -> tuple[dict[str, Any] | None, str]:
    """Per-stage p50/p99 (ms) from the overhead benchmark's result, when it exists."""
    for path in sorted(RESULTS_DIR.glob("overhead-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text())
            stages = data.get("pipeline", {}).get("stages") or data.get("stages")
            if isinstance(stages, dict):
                return {
                    k: {"p50": float(v["p50"]), "p99": float(v.get("p99", math.nan))}
                    for k, v in stages.items()
                    if isinstance(v, dict) and "p50" in v
                }, path.name
    return None, ""


async def run_fleet(
    preset: FleetPreset,
    *,
    out: Path,
    data_dir: Path,
    say: Callable[[str], None] = print,
    bar: Callable[[str, int], Any] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run every system of ``preset`` and write the result JSON (and gzipped records beside it)."""
    from bench.report import render_plots

    if bar is None:
        from tqdm import tqdm

        def bar(desc: str, total: int) -> Any:
            return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)

    from infra.embedding import SentenceTransformerEmbedder
    from infra.settings import EmbeddingSettings

    started = time.time()
    services, _ = load_calibration()
    offline = offline_quality_model(fallback=PRIMARY_QUALITY)
    quality = offline if preset.quality_source == "offline" else PRIMARY_QUALITY
    alternative = PRIMARY_QUALITY if preset.quality_source == "offline" else offline
    workbench = build_workbench(preset)
    say(
        f"workload: {len(workbench.bank)} bank entries, "
        + ", ".join(f"{k} {len(v)}" for k, v in workbench.phases.items())
    )
    records: list[RequestResult] = []
    depths: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per run, nothing else is waiting
    async with SentenceTransformerEmbedder(EmbeddingSettings(threads=2)) as embedder:
        say("embedding the bank and the stream (MiniLM)")
        bank_vectors = np.asarray(await embedder.embed([t for t, _ in workbench.bank]), dtype=np.float64)
        stream = [s for phase in workbench.phases.values() for s in phase]
        stream_vectors = np.asarray(await embedder.embed([s.text for s in stream]), dtype=np.float64)
        sweep = simulate_semantic_cache(
            bank_vectors,
            [g for _, g in workbench.bank],
            stream_vectors,
            [s.group_id for s in stream],
            [round(x, 3) for x in np.arange(0.50, 1.0001, 0.025)],
            quality,
        )
        utility_path: Path | None = None
        if preset.trained_utility:
            utility_path = data_dir / "utility-model.json"
            facts["utility_training"] = await train_utility(preset, embedder, workbench.groups, utility_path)
            say(f"utility model trained offline: {facts['utility_training']}")
        async with Fleet(preset, services, data_dir, say) as fleet:
            for system in preset.systems:
                say(f"--- {system}")
                r, d, f = await _run_system(
                    system,
                    fleet,
                    workbench,
                    bank_vectors,
                    quality,
                    embedder=embedder,
                    say=say,
                    bar=bar,
                    utility_model_path=utility_path,
                )
                records += r
                depths += d
                facts[system] = f
    summaries = {
        phase: {
            system: summarize(
                [r for r in records if r.system == system and r.phase == phase], large_tier=LARGE
            )
            for system in preset.systems
            if any(r.system == system and r.phase == phase for r in records)
        }
        for phase in workbench.phases
    }
    overhead, overhead_source = _load_overhead()
    records_path = out.with_name(out.stem + "-records.jsonl.gz")
    result: dict[str, Any] = {
        "label": f"echolm bench fleet --preset {preset.name} | commit {machine()['commit']} | "
        f"{time.strftime('%Y-%m-%d')}",
        "command": command,
        "preset": asdict(preset),
        "machine": machine(),
        "started_at": started,
        "wall_s": time.time() - started,
        "services": {
            "small": asdict(services[preset.small_model]),
            "large": asdict(services[preset.large_model]),
            "time_scale": preset.time_scale,
        },
        "quality_model": quality.table(),
        "quality_source": preset.quality_source,
        "what_if_quality": {
            "quality_model": alternative.table(),
            "summaries": summaries_to_json(
                {
                    phase: {
                        name: summarize(
                            requality(
                                [r for r in records if r.system == name and r.phase == phase],
                                {c: v["win_rate"] for c, v in alternative.table().items()},
                            ),
                            large_tier=LARGE,
                        )
                        for name in group
                    }
                    for phase, group in summaries.items()
                }
            ),
        }
        if alternative is not quality
        else None,
        "quality_sensitivity": quality_sensitivity(
            records, {c: v["win_rate"] for c, v in quality.table().items()}
        ),
        "phases": {k: {"description": v} for k, v in workbench.description.items()},
        "summaries": summaries_to_json(summaries),
        "headline": headline(summaries, sweep),
        "semantic_cache_sweep": sweep,
        "semantic_cache_threshold": preset.semantic_threshold,
        "systems": facts,
        "queue_depth_samples": depths,
        "timeline_bin_s": preset.timeline_bin_s,
        "overhead_stages": overhead,
        "overhead_source": overhead_source,
        "records_path": records_path.name,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    records_path.write_bytes(gzip.compress("".join(json.dumps(asdict(r)) + "\n" for r in records).encode()))
    out.write_text(json.dumps(result, indent=1, default=float))  # noqa: ASYNC240 - once per run, nothing else is waiting
    plots = render_plots(result, records, PLOTS_DIR)
    result["plots"] = [str(p.relative_to(PLOTS_DIR.parent.parent)) for p in plots]
    out.write_text(json.dumps(result, indent=1, default=float))  # noqa: ASYNC240 - once per run, nothing else is waiting
    return result
