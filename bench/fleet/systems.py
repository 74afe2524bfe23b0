"""Both phases of one system on the shared fleet: echolm (a fresh worker), the semantic cache, or
direct dispatch to one tier."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import DirectDispatcher, SemanticCache, open_loop, serve_direct, serve_semantic_cache
from bench.calibrate import QualityModel
from bench.fleet.echolm_path import LogWatcher, seed_bank, serve_echolm
from bench.fleet.preset import LARGE, SMALL, TENANT
from bench.fleet.replicas import DepthSampler, Fleet
from bench.fleet.workbench import Workbench
from bench.report import RequestResult

__all__ = ["run_system"]


def _phase_clock(loop: asyncio.AbstractEventLoop, lead_s: float = 0.2) -> Callable[[], float]:
    """Seconds since a phase starts (``open_loop`` starts its clock ``lead_s`` from now too)."""
    t0 = loop.time() + lead_s

    def clock() -> float:
        return loop.time() - t0

    return clock


async def run_system(
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
    from infra.topics import create_topics
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
