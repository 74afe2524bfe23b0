"""Repeated, interleaved measurement over one bank: the pipeline per variant, the in-process peer,
and the medians across runs.

``--runs N --variant NAME=KEY=VALUE;KEY=VALUE`` runs, N times in turn: the pipeline once per variant
(``default`` = the bench's settings, then each ``--variant`` on top of them), each with a fresh
``echolm worker``, then (``--peer``) the in-process peer with the last variant's settings. Every
variant thus sees the same bank, stack and machine state, in alternation. ``summarise`` takes the
median over runs of each headline number, and with ``--floors`` each stage's ratio to its floor.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.floors import stage_ratios
from bench.overhead.config import Preset
from bench.overhead.cpu import cpu_delta, cpu_per_reply, cpu_snapshot
from bench.overhead.drive import drain, drive
from bench.overhead.stages import analyse, scrape_stages, stage_deltas
from bench.overhead.workload import question
from bench.peer import InProcessPeer
from bench.stats import summary
from devstack.workers import WorkerProcess
from echolm.client import EchoClient
from infra.settings import Settings, parse_overrides

__all__ = ["parse_variant", "peer_phases", "pipeline_phases", "summarise", "with_overrides"]


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``NAME=section.key=value;section.key=value`` -> (NAME, overrides)."""
    name, _, pairs = text.partition("=")
    if not name or not pairs:
        raise SystemExit(f"--variant wants NAME=section.key=value[;...], got {text!r}")
    return name, parse_overrides([p for p in pairs.split(";") if p])


def with_overrides(settings: Settings, overrides: Mapping[str, Mapping[str, Any]]) -> Settings:
    """``settings`` with ``overrides`` applied and validated (JSON values become paths, literals...)."""
    update = {}
    for section, values in overrides.items():
        current = getattr(settings, section)
        update[section] = type(current).model_validate({**current.model_dump(), **values})
    return settings.model_copy(update=update)


def _phases(preset: Preset, rng: np.random.Generator) -> list[tuple[str, list[str], float | None, float]]:
    steps = ((preset.low_rate, preset.low_duration_s), (preset.rate, preset.duration_s))
    phases: list[tuple[str, list[str], float | None, float]] = [
        (f"steady@{rate:g}", [question(rng) for _ in range(int(rate * seconds))], rate, 30.0)
        for rate, seconds in steps
        if rate > 0
    ]
    phases.append(
        ("saturation", [question(rng) for _ in range(preset.saturate)], None, preset.saturate_window_s)
    )
    return phases


async def pipeline_phases(
    settings: Settings, preset: Preset, rng: np.random.Generator, log_path: Path
) -> dict[str, Any]:
    """A fresh worker with ``settings``: warm-up, the steady phases and the saturation burst."""
    out: dict[str, Any] = {}
    worker = WorkerProcess(settings, log_path=log_path, name="bench-worker")
    worker.start()
    try:
        await worker.wait_ready(timeout_s=180)
        port = settings.worker.metrics_port
        async with EchoClient(settings) as client:
            await drive(client, [question(rng) for _ in range(100)], rate=25, desc="warm-up",
                        max_new_tokens=preset.max_new_tokens, timeout_s=60)  # fmt: skip
            out["warmup_drain"] = await drain(client, 60)
            for name, prompts, rate, wait_s in _phases(preset, rng):
                scrape0, cpu0, t0 = (
                    await asyncio.to_thread(scrape_stages, port),
                    cpu_snapshot(),
                    time.perf_counter(),
                )
                replies, send_s, elapsed = await drive(
                    client, prompts, rate=rate, desc=name if rate is None else f"{name} {rate:g} req/s",
                    max_new_tokens=preset.max_new_tokens, timeout_s=wait_s,
                )  # fmt: skip
                scrape1, cpu1, t1 = (
                    await asyncio.to_thread(scrape_stages, port),
                    cpu_snapshot(),
                    time.perf_counter(),
                )
                out[name] = {
                    "rate": rate, "sent": len(prompts), "send_s": send_s, "sent_per_s": len(prompts) / send_s,
                    "elapsed_s": elapsed, **analyse(replies, elapsed),
                    "worker_metrics_ms": stage_deltas(scrape0, scrape1),
                    "cpu": cpu_per_reply(cpu_delta(cpu0, cpu1, t1 - t0), t1 - t0, len(replies)),
                }  # fmt: skip
                if name != "saturation":  # a backlog left by this phase would skew the next one
                    out[name]["drain"] = await drain(client, preset.saturate_window_s)
            out["client_duplicates"] = client.duplicates
    finally:
        out["worker_exit"] = await worker.stop(timeout_s=20)
        out["worker_log_tail"] = worker.log_tail(15).splitlines()
    return out


async def peer_phases(settings: Settings, preset: Preset, rng: np.random.Generator) -> dict[str, Any]:
    """The same phases through ``InProcessPeer`` (no worker, no broker), with ``settings``' adapters."""
    from infra.resources import default_factories

    factories = default_factories()
    embedder = await factories.embedder(settings.model_copy(
        update={"embedding": settings.embedding.model_copy(update={"cache_size": 0})}
    ))  # fmt: skip
    store = await factories.store(settings)
    generators = await factories.generators(settings)
    probe = await factories.probe(settings)
    out: dict[str, Any] = {}
    try:
        peer = InProcessPeer(settings, embedder=embedder, store=store, generators=generators, probe=probe,
                             tenant="bench", max_new_tokens=preset.max_new_tokens)  # fmt: skip
        await peer.drive([question(rng) for _ in range(50)], rate=25)  # warm-up
        for name, prompts, rate, _ in _phases(preset, rng):
            cpu0, t0 = cpu_snapshot(), time.perf_counter()
            results, elapsed = await peer.drive(prompts, rate)
            cpu1, t1 = cpu_snapshot(), time.perf_counter()
            out[name] = {
                "rate": rate,
                "replies": len(results),
                "replies_per_s": len(results) / elapsed,
                "stages_ms": {
                    k: summary([r[k] for r in results])
                    for k in ("embed", "retrieve", "select", "route", "generate")
                },
                "end_to_end_ms": summary([r["end_to_end"] for r in results]),
                "overhead_ms": summary([r["overhead"] for r in results]),
                "cpu": cpu_per_reply(cpu_delta(cpu0, cpu1, t1 - t0), t1 - t0, len(results)),
            }
    finally:
        await embedder.aclose()
        await store.aclose()
        for generator in generators.values():
            await generator.aclose()
        close = getattr(probe, "aclose", None)
        if close is not None:
            await close()
    return out


_HEADLINE = (("overhead_ms", "p50"), ("overhead_ms", "p99"), ("end_to_end_ms", "p50"))


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return round(statistics.median(finite), 3) if finite else None


def summarise(
    runs: Sequence[Mapping[str, Any]], floors: Mapping[str, Any] | None, micro: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Per variant and phase: the median over runs of overhead p50/p99, end-to-end p50, replies/s,
    each stage's p50, CPU ms per reply by role, and (with floors) the median stage/floor ratios."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        phases = [k for k in mine[0] if k.startswith("steady@") or k == "saturation"]
        out[variant] = {}
        for phase in phases:
            rows = [r[phase] for r in mine if phase in r]
            cell: dict[str, Any] = {"runs": len(rows)}
            for key, q in _HEADLINE:
                cell[f"{key.removesuffix('_ms')}_{q}_ms"] = _median([row[key][q] for row in rows])
            cell["replies_per_s"] = _median([row["replies_per_s"] for row in rows])
            cell["stage_p50_ms"] = {
                stage: _median([row["stages_ms"][stage]["p50"] for row in rows if stage in row["stages_ms"]])
                for stage in rows[0]["stages_ms"]
            }
            emits = [row.get("worker_metrics_ms", {}).get("emit", {}).get("p50") for row in rows]
            if any(e is not None for e in emits):
                cell["stage_p50_ms"]["emit"] = _median([e for e in emits if e is not None])
            roles = {k for row in rows for k in row["cpu"].get("cpu_ms_per_reply_by_role", {})}
            cell["cpu_ms_per_reply"] = {
                role: _median([row["cpu"].get("cpu_ms_per_reply_by_role", {}).get(role) for row in rows])
                for role in sorted(roles)
            }
            cell["loadavg_1m"] = _median([row["cpu"]["loadavg_1m"] for row in rows])
            cell["others_cores"] = _median([row["cpu"]["others_cores"] for row in rows])
            if floors and "embed_batches" in rows[0]:
                backend = mine[0].get("embedding_backend")
                ratios = [stage_ratios(row, floors, micro, backend) for row in rows]
                cell["ratio_p50"] = {
                    stage: _median([r["ratio_p50"].get(stage) for r in ratios])
                    for stage in ratios[0]["ratio_p50"]
                }
                cell["sum_of_floors_ms"] = _median([r["sum_of_floors_ms"] for r in ratios])
                cell["overhead_over_floors"] = _median([r["overhead_over_floors"] for r in ratios])
            out[variant][phase] = cell
    return out
