"""The fleet benchmark's PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.report.headline import timeline
from bench.report.records import RequestResult
from bench.report.summary import SystemSummary

__all__ = ["render_plots"]

_Save = Callable[[Any, str], None]
_Summaries = Mapping[str, Mapping[str, SystemSummary]]


_COLORS = {
    "large-only": "#d62728",
    "small-only": "#9467bd",
    "semantic-cache": "#8c564b",
    "echolm-load-blind": "#1f77b4",
    "echolm": "#2ca02c",
}


def _summary(data: Mapping[str, Any]) -> SystemSummary:
    d = dict(data)
    d["quality_ci"] = tuple(d["quality_ci"])
    return SystemSummary(**{k: d[k] for k in SystemSummary.__dataclass_fields__ if k in d})


def _plot_latency_cdf(plt: Any, save: _Save, summaries: _Summaries, records: Sequence[RequestResult]) -> None:
    # 2. latency CDFs, burst phase
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in summaries.get("burst", {}):
        lat = sorted(
            r.latency_s
            for r in records
            if r.system == name and r.phase == "burst" and r.ok and r.latency_s is not None
        )
        if lat:
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=name, color=_COLORS.get(name, "black"))
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency from scheduled arrival (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF under the bursty workload")
    ax.axhline(0.99, color="grey", ls=":", lw=1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save(fig, "fleet-latency-cdf")


def _plot_offload_over_time(
    plt: Any, save: _Save, summaries: _Summaries, records: Sequence[RequestResult], *, bin_s: float
) -> None:
    # 3. offload ratio and offered load over time, burst phase
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    offered_drawn = False
    for name in summaries.get("burst", {}):
        rows = timeline([r for r in records if r.system == name and r.phase == "burst"], bin_s=bin_s)
        if not rows:
            continue
        t = [row["t_s"] + bin_s / 2 for row in rows]
        if not offered_drawn:
            ax1.bar(
                [row["t_s"] for row in rows],
                [row["offered_rps"] for row in rows],
                width=bin_s,
                align="edge",
                color="#dddddd",
                label="offered load",
            )
            offered_drawn = True
        ax1.plot(t, [row["completed_rps"] for row in rows], color=_COLORS.get(name, "black"), label=name)
        ax2.plot(
            t,
            [row["offload_ratio"] for row in rows],
            marker=".",
            color=_COLORS.get(name, "black"),
            label=name,
        )
    ax1.set_ylabel("requests/s")
    ax1.set_title(f"Bursty workload: offered load, completions and offload per {bin_s:.0f} s")
    ax1.legend(fontsize=7, ncol=3)
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("share not answered by the large\ntier (small tier or cache hit)")
    ax2.set_xlabel("time since the start of the stream (s)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(alpha=0.3)
    save(fig, "fleet-offload-over-time")


def _plot_semantic_cache(
    plt: Any, save: _Save, summaries: _Summaries, sweep: Sequence[Mapping[str, Any]]
) -> None:
    # 4. semantic cache sweep against echolm's operating points
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(
            [r["hit_rate"] for r in sweep],
            [r["quality"] for r in sweep],
            "o-",
            ms=3,
            color=_COLORS["semantic-cache"],
            label="semantic cache, threshold swept",
        )
        for r in sweep[:: max(1, len(sweep) // 6)]:
            ax.annotate(f"{r['threshold']:.2f}", (r["hit_rate"], r["quality"]), fontsize=6)
        for phase, marker in (("burst", "*"), ("saturation", "P")):
            for name in ("echolm", "echolm-load-blind"):
                point = summaries.get(phase, {}).get(name)
                if point is not None:
                    ax.plot(
                        point.offload_ratio,
                        point.quality,
                        marker,
                        ms=12,
                        color=_COLORS[name],
                        label=f"{name} ({phase})",
                    )
        ax.set_xlabel("hit rate (cache) / offload ratio (echolm): share not served by the large model")
        ax.set_ylabel("win rate vs large model (quality model)")
        ax.set_title("Quality at equal hit rate: semantic caching vs in-context caching")
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "fleet-vs-semantic-cache")


def _plot_stage_overhead(plt: Any, save: _Save, result: Mapping[str, Any]) -> None:
    # 5. per-stage overhead from the overhead benchmark, when it exists
    overhead = result.get("overhead_stages")
    if overhead:
        names = [n for n in overhead if isinstance(overhead[n], Mapping) and "p50" in overhead[n]]
        if names:
            fig, ax = plt.subplots(figsize=(7, 4.2))
            x = np.arange(len(names))
            ax.bar(x - 0.2, [overhead[n]["p50"] for n in names], 0.4, label="p50")
            ax.bar(x + 0.2, [overhead[n].get("p99", math.nan) for n in names], 0.4, label="p99")
            ax.set_xticks(x, names, rotation=20)
            ax.set_ylabel("milliseconds per request")
            ax.set_title(
                f"echolm per-stage overhead (from {result.get('overhead_source', 'overhead bench')})"
            )
            ax.legend()
            ax.grid(alpha=0.3, axis="y")
            save(fig, "fleet-stage-overhead")


def render_plots(result: Mapping[str, Any], records: Sequence[RequestResult], out_dir: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg): quality vs throughput, latency CDFs, offload over time under the
    burst, semantic-cache sweep, per-stage overhead (when an overhead result is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    label = result.get("label", "")
    preset = result.get("preset", {}).get("name", "")

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{name}-{preset}.png" if preset else out_dir / f"{name}.png"
        fig.text(0.99, -0.02, label, ha="right", va="top", fontsize=6, color="#666666")
        fig.savefig(path, dpi=130, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    summaries = {p: {n: _summary(s) for n, s in group.items()} for p, group in result["summaries"].items()}

    # 1. quality vs throughput
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, phase in zip(axes, ("saturation", "burst"), strict=True):
        for name, s in summaries.get(phase, {}).items():
            lo, hi = s.quality_ci
            ax.errorbar(
                s.sustained_rps if phase == "saturation" else s.throughput_rps,
                s.quality,
                yerr=[[s.quality - lo], [hi - s.quality]],
                fmt="o",
                ms=8,
                capsize=4,
                color=_COLORS.get(name, "black"),
                label=name,
            )
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.text(ax.get_xlim()[0], 0.505, " parity with the large model", fontsize=7, color="grey")
        ax.set_xlabel(
            "sustained throughput, 10th-90th pct completions (req/s)"
            if phase == "saturation"
            else "throughput, completed / makespan (req/s)"
        )
        ax.set_title(f"{phase}: quality vs throughput")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("win rate vs large model (quality model)")
    axes[1].legend(fontsize=8, loc="lower left")
    save(fig, "fleet-quality-vs-throughput")

    _plot_latency_cdf(plt, save, summaries, records)
    _plot_offload_over_time(plt, save, summaries, records, bin_s=float(result.get("timeline_bin_s", 5.0)))
    _plot_semantic_cache(plt, save, summaries, result.get("semantic_cache_sweep") or [])
    _plot_stage_overhead(plt, save, result)
    return written
