"""The sweep's pieces merged: per pattern, system and load the p50/p99 latency, throughput, offload and
quality with its interval (``bench.quality_cells``), capacity at the SLO, the paper's 0.56 as a
labelled sensitivity row, and the plots (quality against throughput, latency CDFs, offload over time).
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.hostfacts import metadata
from bench.quality_cells import PAPER_SMALL_MATCH, PLACEHOLDER, QualityCells

__all__ = ["capacity_at_slo", "summarize_point", "write_report"]

PLOTS = Path(__file__).resolve().parents[2] / "docs" / "plots"
CEILING = "offloading every request from the 1.5B to the 0.5B model buys at most ~1.6x on equal hardware "
CEILING += "(decode at batch 64: 5.20 vs 3.32 ms, gpu-qwen-h200.md; 1.47x at batch 128 in docs/gpu-replay.md)"


def _q(values: Sequence[float], p: float) -> float:
    return float(np.percentile(values, p)) if len(values) else math.nan


def summarize_point(rows: Sequence[Mapping[str, Any]], cells: QualityCells) -> dict[str, Any]:
    """One (system, phase): latency, throughput, offload and quality of its records."""
    lat = [r["done_s"] - r["arrival_s"] for r in rows if r["ok"] and r["done_s"] is not None]
    done = [r["done_s"] for r in rows if r["ok"] and r["done_s"] is not None]
    span = (max(done) - min(r["arrival_s"] for r in rows)) if done else math.nan
    counts = Counter(str(r["condition"]) if r["ok"] else "failed" for r in rows)
    tiers = Counter(r["tier"] for r in rows if r["ok"])
    answered = sum(tiers.values())
    return {
        "n": len(rows),
        "ok": len(lat),
        "failed": len(rows) - len(lat),
        "p50_s": _q(lat, 50),
        "p99_s": _q(lat, 99),
        "throughput_rps": len(done) / span if span and span > 0 else math.nan,
        "offload": (tiers.get("small", 0) + tiers.get("cache", 0)) / answered if answered else math.nan,
        "conditions": dict(counts),
        "quality": cells.score(counts).as_dict(),
        "quality_paper_small_match": cells.with_small_match(PAPER_SMALL_MATCH, "PAPER")
        .score(counts)
        .as_dict(),
        "latencies_s": sorted(lat),
    }


def capacity_at_slo(points: Sequence[tuple[float, float]], slo_s: float) -> float | None:
    """The offered rate at which p99 crosses ``slo_s`` (linear between measured loads); ``None`` when
    even the lightest load misses it; the heaviest rate when none does (a lower bound)."""
    pts = sorted(points)
    if not pts or not (pts[0][1] <= slo_s):
        return None
    for (r0, p0), (r1, p1) in itertools.pairwise(pts):
        if not (p1 <= slo_s):
            return r0 if math.isnan(p1) else r0 + (slo_s - p0) / (p1 - p0) * (r1 - r0)
    return pts[-1][0]


def write_report(pieces: Sequence[Path], *, out: Path, slo_s: float | None = None) -> str:
    loaded = [json.loads(gzip.decompress(p.read_bytes())) for p in pieces]
    placeholder = any(d["quality_source"].startswith("PLACEHOLDER") for d in loaded)
    cells = PLACEHOLDER if placeholder else QualityCells.load()
    points: dict[str, dict[str, dict[str, Any]]] = {}  # pattern -> system -> phase -> summary
    meta: dict[str, Any] = {}
    for d in loaded:
        meta[d["pattern"]] = d["meta"]
        by: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for r in d["records"]:
            by.setdefault((r["system"], r["phase"]), []).append(r)
        for (system, phase), rows in by.items():
            points.setdefault(d["pattern"], {}).setdefault(system, {})[phase] = summarize_point(rows, cells)
    if slo_s is None:
        base = [
            p
            for pat in points.values()
            for ph, p in pat.get("large-only", {}).items()
            if ph.endswith("-0.5x")
        ]
        slo_s = 3 * float(np.median([p["p50_s"] for p in base])) if base else 60.0
    capacity = {
        pattern: {
            system: capacity_at_slo(
                [(meta[pattern]["phases"][ph]["rate_rps"], s["p99_s"]) for ph, s in phases.items()], slo_s
            )
            for system, phases in systems.items()
        }
        for pattern, systems in points.items()
    }
    first = min(loaded, key=lambda d: float(d["started_at"]))
    result = {
        **metadata(
            "fleet-sweep",
            command="python -m bench.fleet.sweep report " + " ".join(str(p) for p in pieces),
            started_at=float(first["started_at"]),
            wall_s=sum(d["wall_s"] for d in loaded),
        ),
        "machine": first["host"],
        "quality_source": cells.source,
        "slo": {"p99_s": slo_s, "rule": "p99 end-to-end latency; default 3x large-only's p50 at 0.5x load"},
        "ceiling": CEILING,
        "meta": meta,
        "capacity_at_slo_rps": capacity,
        "points": {
            pat: {
                s: {ph: {k: v for k, v in x.items() if k != "latencies_s"} for ph, x in phs.items()}
                for s, phs in syss.items()
            }
            for pat, syss in points.items()
        },
        "pieces": [str(p) for p in pieces],
    }
    out.write_text(json.dumps(result, indent=1, default=float))
    _plots(points, meta, placeholder)
    return _markdown(result)


def _markdown(result: Mapping[str, Any]) -> str:
    slo = result["slo"]["p99_s"]
    lines = [f"Quality: {result['quality_source']}. SLO: p99 <= {slo:.1f} s. {result['ceiling']}."]
    for pattern, systems in result["points"].items():
        lines += [
            "",
            f"**{pattern}** (large-only nominal {result['meta'][pattern]['large_only_nominal_rps']:.2f} rps)",
            "",
        ]
        lines += [
            "| system | load | p50 / p99 (s) | throughput (req/s) | offload | failed "
            "| win rate vs large (95% CI) | with paper's 0.56 (sensitivity) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for system, phases in systems.items():
            for phase, s in phases.items():
                q, qp = s["quality"], s["quality_paper_small_match"]
                lines.append(
                    f"| {system} | {phase} | {s['p50_s']:.2f} / {s['p99_s']:.2f} | "
                    f"{s['throughput_rps']:.2f} | {s['offload']:.0%} | {s['failed']} | "
                    f"{q['mean']:.3f} ({q['ci_low']:.3f}-{q['ci_high']:.3f}) | "
                    f"{qp['mean']:.3f} |"
                )
        cap = result["capacity_at_slo_rps"][pattern]
        lines.append("")
        lines.append(
            "Capacity at the SLO (req/s): "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in cap.items())
        )
    return "\n".join(lines)


def _plots(points: Mapping[str, Any], meta: Mapping[str, Any], placeholder: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tag = " (PLACEHOLDER quality: smoke test)" if placeholder else ""
    PLOTS.mkdir(parents=True, exist_ok=True)
    for pattern, systems in points.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system, phases in systems.items():
            xs = [s["throughput_rps"] for s in phases.values()]
            qs = [s["quality"] for s in phases.values()]
            ax.errorbar(
                xs,
                [q["mean"] for q in qs],
                fmt="o-",
                capsize=3,
                label=system,
                yerr=[[q["mean"] - q["ci_low"] for q in qs], [q["ci_high"] - q["mean"] for q in qs]],
            )
        ax.set(
            xlabel="throughput (req/s)",
            ylabel="win rate vs large alone (95% CI)",
            title=f"quality vs throughput, {pattern}{tag}",
        )
        ax.legend(fontsize=7)
        fig.savefig(PLOTS / f"fleet-sweep-quality-vs-throughput-{pattern}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        phases_all = sorted(
            {ph for s in systems.values() for ph in s}, key=lambda p: meta[pattern]["phases"][p]["load"]
        )
        fig, axes = plt.subplots(
            1, len(phases_all), figsize=(4 * len(phases_all), 3.5), sharey=True, squeeze=False
        )
        for ax, ph in zip(axes[0], phases_all, strict=True):
            for system, phases in systems.items():
                lat = phases.get(ph, {}).get("latencies_s", [])
                if lat:
                    ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=system)
            ax.set(title=ph, xlabel="end-to-end latency (s)")
        axes[0][0].set_ylabel("CDF")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"latency CDFs per load{tag}")
        fig.savefig(PLOTS / f"fleet-sweep-latency-cdf-{pattern}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4))
        for system, phases in systems.items():
            loads = [meta[pattern]["phases"][ph]["load"] for ph in phases]
            ax.plot(loads, [s["offload"] for s in phases.values()], "o-", label=system)
        ax.set(
            xlabel="offered load (x large-only nominal capacity)",
            ylabel="offload (small tier or cache)",
            title=f"offload by load, {pattern}{tag}",
        )
        ax.legend(fontsize=7)
        fig.savefig(PLOTS / f"fleet-sweep-offload-{pattern}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
