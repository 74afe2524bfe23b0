"""One fleet run: every system of a preset in turn on one fleet, then the result JSON (records beside
it, gzipped) and the plots."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import simulate_semantic_cache
from bench.calibrate import RESULTS_DIR, load_calibration
from bench.fleet.preset import LARGE, PLOTS_DIR, FleetPreset
from bench.fleet.quality import PRIMARY_QUALITY, offline_quality_model
from bench.fleet.replicas import Fleet
from bench.fleet.systems import run_system
from bench.fleet.training import train_utility
from bench.fleet.workbench import build_workbench
from bench.hostfacts import host_facts, loadavg, metadata
from bench.report import RequestResult, headline, quality_sensitivity, requality, summaries_to_json, summarize

__all__ = ["run_fleet"]


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

    started, load_start = time.time(), loadavg()
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
                r, d, f = await run_system(
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
    machine = host_facts(loadavg_start=load_start, loadavg_end=loadavg())
    result: dict[str, Any] = {
        **metadata("fleet", command=command, started_at=started, wall_s=time.time() - started),
        "machine": machine,
        "label": f"echolm bench fleet --preset {preset.name} | commit {machine['commit']} | "
        f"{time.strftime('%Y-%m-%d')}",
        "preset": asdict(preset),
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
