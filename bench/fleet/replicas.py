"""The shared machinery: broker, Milvus, the emulated replicas of both tiers, and their queue depths."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.calibrate import QualityModel, TierService
from bench.fleet.preset import FLEET_COST_WEIGHT, LARGE, SMALL, FleetPreset

__all__ = ["DepthSampler", "Fleet", "system_backends", "system_settings"]


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
                batched = p.engine == "batched"
                engine_args = (
                    ["--service", service.name, "--time-scale", f"{p.time_scale:g}"]
                    if batched
                    else service.emulator_args(p.time_scale)
                )
                self.servers[name] = DevServerProcess(
                    port=0,
                    engine="batched" if batched else "emulated",
                    model_id=f"{service.name}:{name}",
                    ctx=16384,
                    # batched: TGI's own limit (128 in the system, the engine batches); else the old cap
                    max_batch_size=128 if batched else p.max_batch_size,
                    max_concurrent_requests=128 if batched else 100_000,
                    extra_args=[*engine_args, "--log-level", "WARNING"],
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
        return system_backends(
            self.preset, system, self.small, self.large, url_of=lambda name: self.servers[name].url
        )

    def settings(
        self,
        system: str,
        quality: QualityModel,
        *,
        load_lambda: float | None = None,
        utility_model_path: Path | None = None,
    ) -> Any:
        return self.stack.apply(
            system_settings(
                self.preset,
                self.backends(system),
                quality,
                data_dir=self.data_dir,
                load_lambda=load_lambda,
                utility_model_path=utility_model_path,
            )
        )


def system_backends(
    preset: FleetPreset,
    system: str,
    small: TierService,
    large: TierService,
    *,
    url_of: Callable[[str], str] = lambda name: f"http://{name}.invalid",
) -> list[Any]:
    """The ``tgi.backends`` one system gets: its replicas' names, tiers and costs (cost: the large
    model's decode ms per token over the small one's)."""
    from infra.settings import BackendSettings

    p = preset
    if system == "large-only" or system == "semantic-cache":
        wanted = [f"{LARGE}-{i}" for i in range(p.slots)]
    elif system == "small-only":
        wanted = [f"{SMALL}-{i}" for i in range(p.slots)]
    else:
        wanted = [f"{SMALL}-{i}" for i in range(p.echolm_small)] + [
            f"{LARGE}-{i}" for i in range(p.echolm_large)
        ]
    cost = {SMALL: 1.0, LARGE: large.decode_ms_per_token / small.decode_ms_per_token}
    return [
        BackendSettings(
            name=name,
            url=url_of(name),
            tier=name.split("-")[0],
            cost=round(cost[name.split("-")[0]], 3),
            quality_prior=0.5,
            max_concurrency=256,
        )
        for name in wanted
    ]


def system_settings(
    preset: FleetPreset,
    backends: Sequence[Any],
    quality: QualityModel,
    *,
    data_dir: Path,
    load_lambda: float | None = None,
    utility_model_path: Path | None = None,
) -> Any:
    """echolm's settings for one system of the fleet (before a stack fills in its addresses)."""
    from infra.settings import load_settings

    tag = uuid.uuid4().hex[:8]
    backends = [
        b.model_copy(update={"quality_prior": quality.small_alone if b.tier == SMALL else quality.large})
        for b in backends
    ]
    # Quality here is on the win-rate scale (small alone 0.3, large 0.5: a gap of 0.2, against 0.35
    # for the local defaults), so the cost tie-break stays at 0.05, a quarter of the gap, as in the
    # published run (docs/benchmarks.md, "echolm's configuration for this fleet").
    routing: dict[str, Any] = {"cost_weight": FLEET_COST_WEIGHT}
    if load_lambda is not None:
        routing["load_lambda"] = load_lambda
    if preset.load_q0 is not None:
        routing["load_q0"] = preset.load_q0
    selection: dict[str, Any] = {}
    if utility_model_path is not None:
        selection["utility_model_path"] = str(utility_model_path)
    return load_settings(
        kafka={"topic_prefix": f"bench{tag}", "partitions": 4},
        milvus={"collection": f"bench_{tag}"},
        worker={
            "app_id": f"bench-{tag}",
            "metrics_port": 0,
            "web_port": 0,
            "data_dir": str(data_dir / f"worker-{tag}"),
            "concurrency": preset.worker_concurrency,
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
        stack={"data_dir": str(data_dir)},
    )


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
