"""Offered-load sweep of the fleet (issue 12): the measured Qwen2.5 pair, TGI-like batching, measured
quality, every baseline, loads 0.5x-2x of large-only's capacity, steady and bursty.

    python -m bench.fleet.sweep run --pattern steady --systems large-only,small-only --out DIR
    python -m bench.fleet.sweep report DIR/*.json          # tables, plots, bench/results/fleet-sweep.json

One ``run`` is one piece: the named systems, one after another, each serving every load of one
arrival pattern as consecutive phases (``{pattern}-{load}x``) on a fresh worker; pieces fit in under
ten minutes on two busy cores when they hold two or three systems. What is what:

* **Emulated**: the GPUs. Each replica is a dev TGI server on ``devstack.tgi_batched`` (TGI's batching
  loop and launcher limits) timed by ``devstack.batching.QWEN25_H200_MEASURED`` (this repo's H200
  measurement of the Qwen2.5 0.5B/1.5B shapes, checked against real batched decoding in
  docs/gpu-replay.md) times ``time_scale``, so the fleet, not this host, is the bottleneck.
* **Measured**: routing, example selection, cache hits, every latency; the serving condition of each
  request. **Quality**: the measured cells of ``bench/results/quality-cells.json`` (Qwen2.5-Coder
  0.5B/1.5B), with their intervals, through ``bench.quality_cells``; the paper's 0.56 only as a
  labelled sensitivity row.
* **Load axis**: multiples of large-only's nominal capacity (``bench.gpu_replay.nominal_capacity`` of
  the large model times the replicas, over ``time_scale``), stated with each result; capacity at the
  SLO is read off the measured p99s.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import Scheduled
from bench.calibrate import TierService
from bench.fleet.preset import PRESETS, FleetPreset
from bench.fleet.workbench import Workbench, build_workbench
from bench.quality_cells import PLACEHOLDER, QualityCells
from bench.replay_trace import SYSTEM_TOKENS, TEMPLATE_TOKENS
from devstack.batching import QWEN25_H200_MEASURED, Job

__all__ = ["SWEEP_SYSTEMS", "SweepPreset", "large_only_capacity", "main", "sweep_workbench", "tier_services"]

SWEEP_SYSTEMS = (
    "large-only",
    "small-only",
    "semantic-cache",
    "quality-router",
    "least-busy",
    "echolm-load-blind",
    "echolm",
)


@dataclass(frozen=True, slots=True)
class SweepPreset:
    small: str = "qwen2.5-0.5b"
    large: str = "qwen2.5-1.5b"
    slots: int = 2  # emulated GPUs per system
    echolm_small: int = 1  # of which small, for the mixed systems
    time_scale: float = 20.0
    loads: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    requests_per_load: int = 60
    seed: int = 0
    burst_peak: float = 2.5
    burst_fraction: float = 0.25
    burst_mean_s: float = 4.0

    def fleet(self, systems: Sequence[str]) -> FleetPreset:
        return replace(
            PRESETS["small"],
            name="sweep",
            small_model=self.small,
            large_model=self.large,
            slots=self.slots,
            echolm_small=self.echolm_small,
            time_scale=self.time_scale,
            engine="batched",
            max_batch_size=128,
            burst_requests=self.requests_per_load * len(self.loads),
            saturation_requests=0,
            systems=tuple(systems),
            seed=self.seed,
            drain_timeout_s=180.0,
        )


def tier_services() -> dict[str, TierService]:
    """The measured pair in the fleet's ``TierService`` terms (name, batch-1 step, prefill per token:
    what the fleet reads for costs; the replicas themselves run the full ``ServiceModel``)."""
    return {
        name: TierService(
            name=name,
            prefill_ms_per_token=m.prefill_ms_per_token,
            decode_ms_per_token=m.decode_ms(1),
            batch_slowdown=0.0,
            source=m.source,
        )
        for name, m in QWEN25_H200_MEASURED.items()
    }


def large_only_capacity(sp: SweepPreset, items: Sequence[Scheduled]) -> float:
    """Nominal req/s of ``slots`` large replicas serving ``items`` directly (no examples)."""
    from bench.gpu_replay import nominal_capacity

    jobs = [
        Job(s.request_id, 0.0, SYSTEM_TOKENS + TEMPLATE_TOKENS + len(s.text) // 4, s.max_new_tokens)
        for s in items
    ]
    return sp.slots * nominal_capacity(QWEN25_H200_MEASURED[sp.large], jobs) / sp.time_scale


def sweep_workbench(
    sp: SweepPreset, pattern: str, systems: Sequence[str]
) -> tuple[Workbench, dict[str, Any]]:
    """One phase per load: the stream's next ``requests_per_load`` requests at that load's rate."""
    from bench.workloads import arrival_times

    base = build_workbench(sp.fleet(systems))
    stream = base.phases["burst"]
    capacity = large_only_capacity(sp, stream)
    phases: dict[str, list[Scheduled]] = {}
    meta: dict[str, Any] = {"pattern": pattern, "large_only_nominal_rps": capacity, "phases": {}}
    n = sp.requests_per_load
    for k, load in enumerate(sp.loads):
        rate = load * capacity
        chunk = stream[k * n : (k + 1) * n]
        if pattern == "steady":
            times = np.arange(len(chunk)) / rate
        elif pattern == "bursty":
            times = arrival_times(
                len(chunk),
                rate,
                "bursty",
                seed=sp.seed + k,
                burst_peak=sp.burst_peak,
                burst_fraction=sp.burst_fraction,
                burst_mean_s=sp.burst_mean_s,
            )
        else:
            raise ValueError(f"unknown pattern {pattern!r}; use steady or bursty")
        name = f"{pattern}-{load:g}x"
        phases[name] = [replace(s, at=float(t)) for s, t in zip(chunk, times, strict=True)]
        meta["phases"][name] = {"load": load, "rate_rps": rate, "requests": len(chunk)}
    return replace(base, phases=phases, description={p: f"{v}" for p, v in meta["phases"].items()}), meta


async def run_piece(
    sp: SweepPreset,
    pattern: str,
    systems: Sequence[str],
    quality: QualityCells,
    out: Path,
    data_dir: Path,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The named systems, each through every load of ``pattern``; writes ``out`` (records inside)."""
    from tqdm import tqdm

    from bench.fleet.replicas import Fleet
    from bench.fleet.systems import run_system
    from bench.fleet.training import train_utility
    from bench.hostfacts import host_facts
    from infra.embedding import SentenceTransformerEmbedder
    from infra.settings import EmbeddingSettings

    def bar(desc: str, total: int) -> Any:
        return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)

    started = time.time()
    preset = sp.fleet(systems)
    workbench, meta = sweep_workbench(sp, pattern, systems)
    say(
        f"{pattern}: large-only nominal capacity {meta['large_only_nominal_rps']:.2f} req/s; {meta['phases']}"
    )
    model = quality.as_quality_model()
    records: list[Any] = []
    depths: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per run
    async with SentenceTransformerEmbedder(EmbeddingSettings(threads=2)) as embedder:
        bank_vectors = np.asarray(await embedder.embed([t for t, _ in workbench.bank]), dtype=np.float64)
        utility_path = data_dir / "utility-model.json"
        if any(s.startswith("echolm") for s in systems):
            facts["utility_training"] = await train_utility(preset, embedder, workbench.groups, utility_path)
        async with Fleet(preset, tier_services(), data_dir, say) as fleet:
            for system in systems:
                say(f"--- {system}")
                r, d, f = await run_system(
                    system,
                    fleet,
                    workbench,
                    bank_vectors,
                    model,
                    embedder=embedder,
                    say=say,
                    bar=bar,
                    utility_model_path=utility_path if utility_path.is_file() else None,
                )
                records += r
                depths += d
                facts[system] = f
    result = {
        "what": "bench.fleet.sweep piece",
        "sweep": asdict(sp),
        "pattern": pattern,
        "systems": list(systems),
        "meta": meta,
        "quality_source": quality.source,
        "host": host_facts(),
        "started_at": started,
        "wall_s": time.time() - started,
        "facts": facts,
        "queue_depth_samples": depths,
        "records": [asdict(r) for r in records],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(json.dumps(result, default=float).encode()))  # noqa: ASYNC240 - once
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one piece: some systems through every load of one pattern")
    run.add_argument("--pattern", choices=["steady", "bursty"], required=True)
    run.add_argument("--systems", default=",".join(SWEEP_SYSTEMS))
    run.add_argument("--loads", default="0.5,1,1.5,2")
    run.add_argument("--requests-per-load", type=int, default=60)
    run.add_argument("--time-scale", type=float, default=20.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--quality",
        choices=["measured", "placeholder"],
        default="measured",
        help="placeholder: made-up cells, for smoke tests only (labelled in every output)",
    )
    run.add_argument("--out", type=Path, required=True, help="the piece's .json.gz")
    run.add_argument("--data-dir", type=Path, default=Path("/tmp/echolm-sweep"))
    rep = sub.add_parser("report", help="merge pieces into tables, plots and one result JSON")
    rep.add_argument("pieces", type=Path, nargs="+")
    rep.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "fleet-sweep.json"
    )
    rep.add_argument("--slo-s", type=float, default=0.0, help="p99 SLO (s); 0: 3x large-only's p50 at 0.5x")
    args = parser.parse_args(argv)
    if args.command == "report":
        from bench.fleet.sweep_report import write_report

        print(write_report(args.pieces, out=args.out, slo_s=args.slo_s or None))
        return 0
    sp = SweepPreset(
        time_scale=args.time_scale,
        loads=tuple(float(x) for x in args.loads.split(",")),
        requests_per_load=args.requests_per_load,
        seed=args.seed,
    )
    quality = PLACEHOLDER if args.quality == "placeholder" else QualityCells.load()
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SWEEP_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SWEEP_SYSTEMS}")
    asyncio.run(run_piece(sp, args.pattern, systems, quality, args.out, args.data_dir / args.pattern))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
