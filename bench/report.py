"""Fleet benchmark results: per-request records, aggregation, comparisons, plots, Markdown.

    echolm bench report                                  # plots + tables from bench/results/fleet-small.json
    echolm bench report --result bench/results/fleet-full.json --plots docs/plots

Everything above ``plot_*`` is pure (no I/O, no clock) and unit-tested: ``RequestResult`` is one
request as a system served it, ``summarize`` turns a system's records into ``SystemSummary``,
``timeline`` bins them over time, ``headline`` computes the ratios BENCHMARKS.md quotes.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.policy.scoring import bootstrap_ci

__all__ = [
    "RequestResult",
    "SystemSummary",
    "headline",
    "interpolate_at",
    "markdown_tables",
    "parity_verdict",
    "percentile",
    "quality_sensitivity",
    "render_plots",
    "summarize",
    "timeline",
]


# -------------------------------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request as one system served it. Times are seconds from the phase's start (``t0``)."""

    system: str
    phase: str  # "burst" or "saturation"
    request_id: str
    group_id: str
    arrival_s: float  # scheduled arrival (open loop: latency counts from here, not from the send)
    sent_s: float
    done_s: float | None  # None: no reply before the drain timeout
    ok: bool
    tier: str = ""  # "small", "large", "cache"
    backend: str = ""
    n_examples: int = 0
    condition: str = "failed"
    quality: float = 0.0
    generate_ms: float | None = None  # backend time as the serving path saw it, when known
    stages_ms: dict[str, float] = field(default_factory=dict)  # echolm's per-stage timings of this request

    @property
    def latency_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.arrival_s

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ------------------------------------------------------------------------------------------ summaries
@dataclass(frozen=True, slots=True)
class SystemSummary:
    system: str
    phase: str
    requests: int
    completed: int
    failed: int
    duration_s: float  # first arrival to last completion
    throughput_rps: float  # completed / duration_s
    sustained_rps: float  # completions per second between the 10th and 90th percentile completion
    offered_rps: float  # requests / arrival span
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    latency_mean_s: float
    quality: float  # mean modelled win rate vs the large model, failures count 0
    quality_ci: tuple[float, float]
    offload_ratio: float  # share of completed requests not answered by the large tier
    tier_share: dict[str, float] = field(default_factory=dict)
    conditions: dict[str, int] = field(default_factory=dict)
    generate_p50_ms: float = math.nan
    overhead_p50_ms: float = math.nan  # latency - backend time, median, where backend time is known


def sustained_rate(done_s: Sequence[float], low: float = 0.1, high: float = 0.9) -> float:
    """Completions per second between the ``low`` and ``high`` quantile completions: the rate a
    saturated system sustains, without the ramp-up and the drain of the longest requests (which
    dominate ``completed / makespan`` for short runs). NaN with fewer than 5 completions."""
    times = sorted(done_s)
    if len(times) < 5:
        return math.nan
    i, j = math.ceil(low * (len(times) - 1)), math.floor(high * (len(times) - 1))
    span = times[j] - times[i]
    return (j - i) / span if span > 0 and j > i else math.nan


def summarize(records: Sequence[RequestResult], *, large_tier: str = "large") -> SystemSummary:
    """Aggregate one system's records of one phase. Raises on an empty or mixed input."""
    if not records:
        raise ValueError("no records to summarize")
    systems = {(r.system, r.phase) for r in records}
    if len(systems) != 1:
        raise ValueError(f"records mix systems/phases {sorted(systems)}; summarize one at a time")
    system, phase = next(iter(systems))
    done = [r for r in records if r.ok and r.done_s is not None]
    latencies = [r.latency_s for r in done if r.latency_s is not None]
    first = min(r.arrival_s for r in records)
    last_arrival = max(r.arrival_s for r in records)
    end = max((r.done_s for r in done if r.done_s is not None), default=first)
    duration = max(end - first, 1e-9)
    qualities = np.asarray([r.quality if r.ok else 0.0 for r in records], dtype=np.float64)
    ci = bootstrap_ci(qualities, seed=0) if len(qualities) > 1 else (float(qualities[0]), float(qualities[0]))
    tiers = Counter(r.tier for r in done)
    generate = [r.generate_ms for r in done if r.generate_ms is not None]
    overhead = [
        r.latency_s * 1e3 - r.generate_ms
        for r in done
        if r.generate_ms is not None and r.latency_s is not None
    ]
    n = len(records)
    return SystemSummary(
        system=system,
        phase=phase,
        requests=n,
        completed=len(done),
        failed=n - len(done),
        duration_s=duration,
        throughput_rps=len(done) / duration,
        sustained_rps=sustained_rate([r.done_s for r in done if r.done_s is not None]),
        offered_rps=n / max(last_arrival - first, 1e-9) if n > 1 else math.nan,
        latency_p50_s=percentile(latencies, 50),
        latency_p90_s=percentile(latencies, 90),
        latency_p99_s=percentile(latencies, 99),
        latency_mean_s=float(np.mean(latencies)) if latencies else math.nan,
        quality=float(qualities.mean()),
        quality_ci=(float(ci[0]), float(ci[1])),
        offload_ratio=(sum(v for t, v in tiers.items() if t != large_tier) / len(done)) if done else math.nan,
        tier_share={t: v / len(done) for t, v in sorted(tiers.items())} if done else {},
        conditions=dict(sorted(Counter(r.condition for r in records).items())),
        generate_p50_ms=percentile(generate, 50),
        overhead_p50_ms=percentile(overhead, 50),
    )


def requality(records: Iterable[RequestResult], table: Mapping[str, float]) -> list[RequestResult]:
    """The same records scored with another quality table (condition -> win rate): what-if analysis
    without re-running, since the conditions are measured and the table is a model."""
    from dataclasses import replace

    return [replace(r, quality=float(table[r.condition]) if r.ok else 0.0) for r in records]


# small_match values the sensitivity table re-scores every run with (0.56: the paper's measurement).
SMALL_MATCH_SENSITIVITY = (0.48, 0.50, 0.52, 0.56)


def parity_verdict(ci: Sequence[float], parity: float = 0.5) -> str:
    """``yes`` when the win rate's CI lower bound reaches ``parity``; ``no (CI includes 0.5)`` when
    only its upper bound does; ``no`` otherwise."""
    low, high = float(ci[0]), float(ci[1])
    if low >= parity:
        return "yes"
    return f"no (CI includes {parity:g})" if high >= parity else "no"


def _win_rate(records: Sequence[RequestResult]) -> tuple[float, tuple[float, float]]:
    """Mean quality (failures 0) and its seeded bootstrap CI, as ``summarize`` computes them."""
    q = np.asarray([r.quality if r.ok else 0.0 for r in records], dtype=np.float64)
    ci = bootstrap_ci(q, seed=0) if len(q) > 1 else (float(q[0]), float(q[0]))
    return float(q.mean()), (float(ci[0]), float(ci[1]))


def quality_sensitivity(
    records: Sequence[RequestResult],
    table: Mapping[str, float],
    values: Sequence[float] = SMALL_MATCH_SENSITIVITY,
    *,
    cell: str = "small_match",
    capacity_phase: str = "saturation",
    parity: float = 0.5,
) -> dict[str, Any]:
    """The same records re-scored with ``table`` and ``cell`` set to each of ``values``.

    The conditions are measured and the table is a model, so re-scoring is exact (no re-run): per value,
    each system's win rate and CI per phase, and echolm's parity verdict (``parity_verdict``: CI lower
    bound >= ``parity``). Capacity does not depend on the table (routing never reads it), so echolm's
    gain over large-only (``sustained_rate`` in ``capacity_phase``) is one number for every row.
    A system's win rate is linear in the cell: ``base + share * value``, ``share`` = its requests served
    under ``cell``; ``break_even`` is the value where the point estimate reaches ``parity`` (NaN when
    ``share`` is 0; above 1: not reachable through this cell alone).
    """
    systems = list(dict.fromkeys(r.system for r in records))
    phases = list(dict.fromkeys(r.phase for r in records))
    groups = {
        (s, ph): [r for r in records if r.system == s and r.phase == ph] for s in systems for ph in phases
    }
    groups = {k: v for k, v in groups.items() if v}
    rows = []
    for value in values:
        scored = {**table, cell: float(value)}
        per: dict[str, dict[str, dict[str, Any]]] = {}
        for (system, phase), rs in groups.items():
            q, ci = _win_rate(requality(rs, scored))
            per.setdefault(system, {})[phase] = {"quality": q, "quality_ci": ci, "parity": parity_verdict(ci)}
        rows.append({"value": float(value), "systems": per})
    share: dict[str, dict[str, float]] = {}
    break_even: dict[str, dict[str, float]] = {}
    for (system, phase), rs in groups.items():
        n_cell = sum(1 for r in rs if r.ok and r.condition == cell)
        base = float(
            np.mean([float(table[r.condition]) if r.ok and r.condition != cell else 0.0 for r in rs])
        )
        f = n_cell / len(rs)
        share.setdefault(system, {})[phase] = f
        break_even.setdefault(system, {})[phase] = (parity - base) / f if f > 0 else math.nan
    gain = math.nan
    large = groups.get(("large-only", capacity_phase))
    echolm = groups.get(("echolm", capacity_phase))
    if large and echolm:
        a = sustained_rate([r.done_s for r in echolm if r.ok and r.done_s is not None])
        b = sustained_rate([r.done_s for r in large if r.ok and r.done_s is not None])
        gain = a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan
    return {
        "cell": cell,
        "values": [float(v) for v in values],
        "parity": parity,
        "table": dict(table),
        "rows": rows,
        "share": share,
        "break_even": break_even,
        "echolm_capacity_gain_vs_large": gain,
        "capacity_phase": capacity_phase,
    }


def timeline(
    records: Sequence[RequestResult], *, bin_s: float, large_tier: str = "large"
) -> list[dict[str, float]]:
    """Per ``bin_s`` window of arrival time: offered requests/s, completions/s (by completion time),
    offload ratio and mean quality of the requests that arrived in it, p50 latency."""
    if not records or bin_s <= 0:
        return []
    end = max(max(r.arrival_s for r in records), max((r.done_s or 0.0) for r in records))
    bins = math.ceil(end / bin_s) or 1
    out = []
    for b in range(bins):
        lo, hi = b * bin_s, (b + 1) * bin_s
        arrived = [r for r in records if lo <= r.arrival_s < hi]
        finished = [r for r in records if r.done_s is not None and lo <= r.done_s < hi]
        served = [r for r in arrived if r.ok and r.done_s is not None]
        lat = [r.latency_s for r in served if r.latency_s is not None]
        out.append(
            {
                "t_s": lo,
                "offered_rps": len(arrived) / bin_s,
                "completed_rps": len(finished) / bin_s,
                "offload_ratio": (sum(r.tier != large_tier for r in served) / len(served))
                if served
                else math.nan,
                "quality": float(np.mean([r.quality for r in arrived])) if arrived else math.nan,
                "latency_p50_s": percentile(lat, 50),
            }
        )
    return out


def interpolate_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """y at ``x`` on the piecewise-linear curve through (xs, ys) sorted by x; NaN outside its range."""
    pairs = sorted((a, b) for a, b in zip(xs, ys, strict=True) if math.isfinite(a) and math.isfinite(b))
    if not pairs or x < pairs[0][0] or x > pairs[-1][0]:
        return math.nan
    for (x0, y0), (x1, y1) in itertools.pairwise(pairs):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pairs[-1][1]


def headline(
    summaries: Mapping[str, Mapping[str, SystemSummary]], cache_sweep: Sequence[Mapping[str, float]] = ()
) -> dict[str, Any]:
    """The ratios BENCHMARKS.md quotes, from one run. ``summaries[phase][system]``.

    * echolm's saturation throughput over large-only's, and the quality it held there;
    * under the burst: echolm against the load-blind router (quality, p50/p99, throughput);
    * against semantic caching (``cache_sweep``: threshold, hit_rate, quality rows from the offline
      sweep over the same stream): the cache's quality at echolm's offload ratio, and the hit rate the
      cache reaches at echolm's quality.
    """
    out: dict[str, Any] = {}
    sat, burst = summaries.get("saturation", {}), summaries.get("burst", {})

    def ratio(a: float, b: float) -> float:
        return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan

    if "echolm" in sat and "large-only" in sat:
        e, large = sat["echolm"], sat["large-only"]
        out["saturation_throughput_gain_vs_large"] = ratio(e.sustained_rps, large.sustained_rps)
        out["saturation_makespan_gain_vs_large"] = ratio(e.throughput_rps, large.throughput_rps)
        out["saturation_echolm_quality"] = e.quality
        out["saturation_echolm_quality_ci"] = e.quality_ci
        out["saturation_meets_parity"] = e.quality_ci[0] >= 0.5  # the CI's lower bound
        out["saturation_parity"] = parity_verdict(e.quality_ci)
    for phase, group in (("burst", burst), ("saturation", sat)):
        if "large-only" in group:
            large = group["large-only"]
            out[f"{phase}_vs_large"] = {
                name: {
                    "throughput_x": ratio(s.throughput_rps, large.throughput_rps),
                    "sustained_x": ratio(s.sustained_rps, large.sustained_rps),
                    "p50_x": ratio(s.latency_p50_s, large.latency_p50_s),
                    "p99_x": ratio(s.latency_p99_s, large.latency_p99_s),
                    "quality": s.quality,
                }
                for name, s in group.items()
            }
    if "echolm" in burst and "echolm-load-blind" in burst:
        e, blind = burst["echolm"], burst["echolm-load-blind"]
        out["burst_vs_load_blind"] = {
            "quality_delta": e.quality - blind.quality,
            "p50_x": ratio(e.latency_p50_s, blind.latency_p50_s),
            "p99_x": ratio(e.latency_p99_s, blind.latency_p99_s),
            "throughput_x": ratio(e.throughput_rps, blind.throughput_rps),
            "offload_echolm": e.offload_ratio,
            "offload_blind": blind.offload_ratio,
        }
    if cache_sweep and "echolm" in burst:
        e = burst["echolm"]
        hits = [row["hit_rate"] for row in cache_sweep]
        quality = [row["quality"] for row in cache_sweep]
        at_equal_hits = interpolate_at(hits, quality, e.offload_ratio)
        at_equal_quality = interpolate_at(quality, hits, e.quality)
        out["vs_semantic_cache"] = {
            "echolm_offload_ratio": e.offload_ratio,
            "echolm_quality": e.quality,
            "cache_quality_at_equal_hit_rate": at_equal_hits,
            "quality_gain_at_equal_hit_rate": e.quality - at_equal_hits,
            "cache_hit_rate_at_equal_quality": at_equal_quality,
            "hit_rate_x_at_equal_quality": ratio(e.offload_ratio, at_equal_quality),
        }
    return out


# ----------------------------------------------------------------------------------------- Markdown
def _fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown_tables(result: Mapping[str, Any]) -> str:
    """The per-system tables (one per phase) of a fleet result JSON."""
    lines: list[str] = []
    for phase, systems in result["summaries"].items():
        lines += [
            f"**{phase}** ({result['phases'][phase]['description']})",
            "",
            "| system | sustained (req/s) | completed / makespan (req/s) | p50 (s) | p99 (s) | "
            "win rate vs large (95% CI) | offload | completed | overhead p50 (ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in systems.items():
            lo, hi = s["quality_ci"]
            lines.append(
                f"| {name} | {_fmt(s['sustained_rps'], '.2f')} | {_fmt(s['throughput_rps'], '.2f')} "
                f"| {_fmt(s['latency_p50_s'])} | "
                f"{_fmt(s['latency_p99_s'])} | {_fmt(s['quality'], '.3f')} "
                f"({_fmt(lo, '.3f')}-{_fmt(hi, '.3f')}) | "
                f"{_fmt(s['offload_ratio'], '.0%')} | {s['completed']}/{s['requests']} | "
                f"{_fmt(s['overhead_p50_ms'], '.0f')} |"
            )
        lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plots
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

    # 3. offload ratio and offered load over time, burst phase
    bin_s = float(result.get("timeline_bin_s", 5.0))
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

    # 4. semantic cache sweep against echolm's operating points
    sweep = result.get("semantic_cache_sweep") or []
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
    return written


def load_result(path: Path) -> tuple[dict[str, Any], list[RequestResult]]:
    """A fleet result JSON and its per-request records (``records_path`` beside it, if present)."""
    result = json.loads(path.read_text())
    records: list[RequestResult] = []
    raw = result.get("records_path")
    if raw:
        raw_path = (path.parent / raw) if not Path(raw).is_absolute() else Path(raw)
        if raw_path.is_file():
            text = (
                gzip.decompress(raw_path.read_bytes()).decode()
                if raw_path.suffix == ".gz"
                else raw_path.read_text()
            )
            records = [RequestResult.from_dict(json.loads(line)) for line in text.splitlines() if line]
    return result, records


def summaries_to_json(summaries: Mapping[str, Mapping[str, SystemSummary]]) -> dict[str, Any]:
    return {p: {n: asdict(s) for n, s in group.items()} for p, group in summaries.items()}


# ------------------------------------------------------------------------------------- BENCHMARKS.md
def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with everything between ``<!-- section:NAME:start -->`` and ``...:end -->`` replaced by
    ``body``; raises if the markers are missing (never appends a second copy)."""
    start, end = f"<!-- section:{name}:start -->", f"<!-- section:{name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"BENCHMARKS.md has no {start} ... {end} markers")
    return text[: i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]


def _x(value: float) -> str:
    return _fmt(value, ".2f") + "x"


def baselines_section(result: Mapping[str, Any]) -> str:
    """The BENCHMARKS.md section for the fleet benchmark, from one result JSON."""
    m, p, h = result["machine"], result["preset"], result["headline"]
    services = result["services"]
    sat = result["summaries"].get("saturation", {})
    burst = result["summaries"].get("burst", {})
    small, large = services["small"], services["large"]
    loads = [
        float(f[key][0])
        for f in result.get("systems", {}).values()
        if isinstance(f, Mapping)
        for key in ("loadavg_before", "loadavg_after")
        if key in f
    ]
    between = f", {min(loads):.1f}-{max(loads):.1f} between systems" if loads else ""
    lines = [
        "## echolm against the baselines (issue 4)",
        "",
        f"Command: `{result.get('command') or 'echolm bench fleet --preset ' + p['name']}`, then "
        f"`echolm bench report --preset {p['name']} --update-benchmarks`. "
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gb']} GiB RAM, Python {m['python']}, commit "
        f"`{m['commit']}`; load average {m['loadavg'][0]:.1f} when the run ended{between} (a shared machine: "
        f"other jobs ran alongside). Wall time {result['wall_s'] / 60:.1f} min. Details and caveats: "
        "docs/benchmarks.md.",
        "",
        "What is what: **measured** = every latency, throughput, routing decision, cache hit and example "
        "selection, end to end on real Kafka (Tansu), Milvus, MiniLM and the echolm worker; **emulated** = "
        f"the GPUs: {p['slots']} emulated replicas per system, TGI protocol, continuous batching up to "
        f"{p['max_batch_size']} sequences, service times from H100 measurements of a {small['name']} "
        f"(small) and an {large['name']} (large) Llama-shaped decoder "
        f"(calibration section below) slowed down {services['time_scale']:g}x so that the fleet, not this "
        "2-core host, is the bottleneck; **modelled** = quality: each reply's win rate against the large "
        "model is looked up from the condition it was served under (table below), so quality differences "
        "come from *where* requests went and *which examples* they got, both measured.",
        "",
        f"Systems, each on {p['slots']} emulated GPUs: large-only ({p['slots']} x {large['name']}), "
        "small-only "
        f"({p['slots']} x {small['name']}), semantic cache (cosine >= {result['semantic_cache_threshold']:g} "
        f"returns the cached answer, else large; {p['slots']} x {large['name']}), echolm-load-blind "
        f"(echolm with `routing.load_lambda=0`, the RouteLLM-style stand-in) and echolm; the last two on "
        f"{p['echolm_small']} x {small['name']} + {p['slots'] - p['echolm_small']} x {large['name']}.",
        "",
    ]
    lines.append(
        "| system | capacity (req/s, saturation) | p50 / p99 under the burst (s) | "
        "win rate vs large, burst (95% CI) | win rate, saturation | offload burst / saturation |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name in burst or sat:
        b, s = burst.get(name), sat.get(name)
        if b is None or s is None:
            continue
        lo, hi = b["quality_ci"]
        lines.append(
            f"| {name} | {_fmt(s['sustained_rps'], '.2f')} "
            f"| {_fmt(b['latency_p50_s'])} / {_fmt(b['latency_p99_s'])} "
            f"| {_fmt(b['quality'], '.3f')} ({_fmt(lo, '.3f')}-{_fmt(hi, '.3f')}) "
            f"| {_fmt(s['quality'], '.3f')} "
            f"| {_fmt(b['offload_ratio'], '.0%')} / {_fmt(s['offload_ratio'], '.0%')} |"
        )
    lines.append("")
    ratios = []
    if "saturation_throughput_gain_vs_large" in h:
        low, high = h["saturation_echolm_quality_ci"]
        verdict = {
            "yes": "reaches parity (0.5: the CI's lower bound is at or above it)",
            "no (CI includes 0.5)": "is not distinguishable from parity (0.5 lies inside the CI) but "
            "does not reach it (the CI's lower bound is below 0.5)",
        }.get(parity_verdict((low, high)), "is below parity (0.5 lies above the CI)")
        ratios.append(
            f"- echolm capacity over large-only: **{_x(h['saturation_throughput_gain_vs_large'])}** "
            f"at a win rate of {_fmt(h['saturation_echolm_quality'], '.3f')} "
            f"(95% CI {_fmt(low, '.3f')}-{_fmt(high, '.3f')}) under the quality table below, "
            f"which {verdict}. Paper: 2.3x on NQ "
            "at 0.5, 1.4-5.9x overall. How this verdict moves with `small_match`: sensitivity table below."
        )
    vl = h.get("burst_vs_large", {}).get("echolm")
    if vl:
        ratios.append(
            f"- Under the burst, echolm against large-only: p50 {_x(vl['p50_x'])}, p99 {_x(vl['p99_x'])} "
            f"(paper: 75-83% lower p50, 69-71% lower p99 against the 27B model)."
        )
    vb = h.get("burst_vs_load_blind")
    if vb:
        ratios.append(
            f"- Against the load-blind router on the same burst: quality {vb['quality_delta']:+.3f}, p50 "
            f"{_x(vb['p50_x'])}, p99 {_x(vb['p99_x'])}, throughput {_x(vb['throughput_x'])}; offload "
            f"{_fmt(vb['offload_echolm'], '.0%')} vs {_fmt(vb['offload_blind'], '.0%')} (paper: +9% quality "
            "over RouteLLM at equal latency and throughput)."
        )
    vc = h.get("vs_semantic_cache")
    if vc:
        sweep = result.get("semantic_cache_sweep") or []
        if math.isfinite(vc["cache_hit_rate_at_equal_quality"]) or not sweep:
            at_quality = (
                "at echolm's quality the cache's hit rate is "
                f"{_fmt(vc['cache_hit_rate_at_equal_quality'], '.0%')} "
                f"({_x(vc['hit_rate_x_at_equal_quality'])} less than echolm's offload; paper: up to 4.1x)"
            )
        else:
            best = max(sweep, key=lambda row: row["quality"])
            at_quality = (
                "the cache reaches echolm's quality at no threshold: its best in the sweep is "
                f"{_fmt(best['quality'], '.3f')} (threshold {best['threshold']:.3f}, hit rate "
                f"{_fmt(best['hit_rate'], '.0%')}; paper: up to 4.1x more offload than the cache at equal "
                "quality)"
            )
        ratios.append(
            "- Against semantic caching at echolm's burst offload ratio "
            f"({_fmt(vc['echolm_offload_ratio'], '.0%')} "
            f"hit rate): cache quality {_fmt(vc['cache_quality_at_equal_hit_rate'], '.3f')} vs echolm "
            f"{_fmt(vc['echolm_quality'], '.3f')} ({vc['quality_gain_at_equal_hit_rate']:+.3f}); "
            f"{at_quality}. From the offline threshold sweep over the same stream (plot below)."
        )
    lines += [*ratios, ""]
    q = result["quality_model"]
    lines.append("Quality model used (win rate against the large model per serving condition):")
    lines.append("")
    lines.append("| condition | win rate | source |")
    lines.append("| --- | --- | --- |")
    for cond, row in q.items():
        lines.append(f"| {cond} | {row['win_rate']:.3f} | {row['source']} |")
    lines.append("")
    what_if = result.get("what_if_quality")
    if what_if:
        lines.append(
            "The same served requests scored with the other quality table (what-if: conditions are measured, "
            "the table is the model):"
        )
        lines.append("")
        lines.append("| condition | " + " | ".join(what_if["quality_model"]) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in what_if["quality_model"]) + " |")
        lines.append(
            "| win rate | "
            + " | ".join(f"{v['win_rate']:.3f}" for v in what_if["quality_model"].values())
            + " |"
        )
        lines.append("")
        lines.append("| system | win rate, burst | win rate, saturation |")
        lines.append("| --- | --- | --- |")
        wb, ws = what_if["summaries"].get("burst", {}), what_if["summaries"].get("saturation", {})
        for name in wb:
            lines.append(
                f"| {name} | {_fmt(wb[name]['quality'], '.3f')} | "
                f"{_fmt(ws.get(name, {}).get('quality', math.nan), '.3f')} |"
            )
        lines.append("")
    sens = result.get("quality_sensitivity")
    if sens:
        lines += sensitivity_lines(sens, q.get(sens["cell"], {}).get("source", ""))
    notes = result.get("notes")
    if notes:
        lines += [notes.strip(), ""]
    plots = result.get("plots", [])
    if plots:
        lines.append("Plots: " + ", ".join(f"[{Path(x).stem}]({x})" for x in plots) + ".")
        lines.append("")
    return "\n".join(lines)


def _verdict_cell(per: Mapping[str, Any]) -> str:
    ci = f"CI {_fmt(per['quality_ci'][0], '.3f')}-{_fmt(per['quality_ci'][1], '.3f')}"
    if per["parity"] == "yes":
        return f"yes ({ci})"
    return f"no ({ci} includes 0.5)" if per["parity"].startswith("no (CI includes") else f"no ({ci})"


def sensitivity_lines(sens: Mapping[str, Any] | None, source: str = "") -> list[str]:
    """The sensitivity table of ``quality_sensitivity`` as Markdown lines (none without one);
    ``source``: where the table's own value of the cell comes from."""
    if not sens or not sens.get("rows"):
        return []
    cell, rows = sens["cell"], sens["rows"]
    systems = list(rows[0]["systems"])
    values = ", ".join(f"{v:.2f}" for v in sens["values"])
    used = sens.get("table", {}).get(cell)
    origin = f" ({used:.2f} in the table above; source: {source})" if source and used is not None else ""
    lines = [
        f"**Sensitivity to `{cell}`**: a model, not a measurement. The conditions each request was served "
        "under are measured in this run; the win rate of each condition is a table, and parity turns on "
        f"one cell of it, `{cell}`{origin}, which nothing on this machine measures for a 1B/8B pair. "
        f"The same served requests re-scored with `{cell}` = {values}, every other cell as in the table "
        "above. Routing never reads this cell (feedback is off: the router keeps its priors), so the "
        "re-scoring is exact and capacity is the same on every row; what changes is whether echolm's "
        "gain is a gain *at parity*. Cells: win rate under the burst / in the saturation phase.",
        "",
        f"| {cell} | "
        + " | ".join(systems)
        + " | echolm capacity over large-only | echolm reaches parity (CI lower bound >= 0.5)? burst / "
        "saturation |",
        "| --- | " + " | ".join("---" for _ in systems) + " | --- | --- |",
    ]
    gain = _x(sens.get("echolm_capacity_gain_vs_large", math.nan))
    for row in rows:
        cells = []
        for name in systems:
            per = row["systems"][name]
            cells.append(
                " / ".join(
                    _fmt(per[ph]["quality"], ".3f") if ph in per else "n/a" for ph in ("burst", "saturation")
                )
            )
        e = row["systems"].get("echolm", {})
        verdicts = " / ".join(_verdict_cell(e[ph]) if ph in e else "n/a" for ph in ("burst", "saturation"))
        lines.append(f"| {row['value']:.2f} | " + " | ".join(cells) + f" | {gain} | {verdicts} |")
    lines.append("")
    share, be = sens.get("share", {}), sens.get("break_even", {})
    for name in ("echolm", "echolm-load-blind"):
        if name not in share:
            continue
        parts = []
        for ph in ("burst", "saturation"):
            if ph not in share[name]:
                continue
            f, b = share[name][ph], be[name][ph]
            where = (
                "never (no request served under it)"
                if not math.isfinite(b)
                else (f"{b:.3f}" if b <= 1 else f"{b:.2f}, i.e. never (a win rate cannot exceed 1)")
            )
            parts.append(
                f"{ph}: {f:.0%} of its requests were served under `{cell}`, so each +0.01 there moves its "
                f"win rate by {f * 0.01:+.4f}, and its point estimate reaches 0.5 at `{cell}` = {where}"
            )
        lines.append(f"- {name}: " + "; ".join(parts) + ".")
    lines.append("")
    return lines


def calibration_section(calibration: Mapping[str, Any], result: Mapping[str, Any] | None = None) -> str:
    """The BENCHMARKS.md calibration section: measured tiers, what the emulator does with them, and
    the derived configurations the fleet benchmark runs."""
    from bench.calibrate import NOTES_DECODE_MS

    lines = [
        "## Emulator calibration (issue 4)",
        "",
        "Commands: `python -m bench.gpu_calibrate --out $OUT/gpu-calibration.json` on the device tool's H100 "
        "(one run, 51 s; random bf16 weights, CUDA graphs, CUDA-event timing, median of 50; "
        "bench/results/gpu-calibration-h100.json), then `echolm bench calibrate` here (the dev server on "
        "this CPU, and the emulator configured as each tier, measured through HTTP the same way; "
        "bench/results/calibration.json). Method and caveats: docs/benchmarks.md.",
        "",
        "| tier | status, where | prefill ms/token | decode ms/token (batch 1) | slowdown per extra sequence "
        "| emulator measured: prefill | decode | slowdown (8 concurrent) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, tier in calibration["tiers"].items():
        check = calibration.get("emulator_check", {}).get(name, {})
        lines.append(
            f"| {name} | {tier['source']} | {tier['prefill_ms_per_token']:.4f} "
            f"| {tier['decode_ms_per_token']:.3f} | {tier['batch_slowdown']:.4f} "
            f"| {_fmt(check.get('prefill_ms_per_token', math.nan), '.4f')} "
            f"| {_fmt(check.get('decode_ms_per_token', math.nan), '.3f')} "
            f"| {_fmt(check.get('implied_batch_slowdown', math.nan), '.4f')} |"
        )
    for name, (b1, b8, b32) in NOTES_DECODE_MS.items():
        lines.append(
            f"| {name} (notes) | other measurement: /work/shared/notes/gpu-calibration.md, torch.compile, "
            f"decode only (b=8 {b8}, b=32 {b32} ms) | not measured | {b1:.3f} "
            f"| {((b32 / b1) - 1) / 31:.4f} | - | - | - |"
        )
    if result is not None:
        s = result["services"]
        scale = float(s["time_scale"])
        for role in ("small", "large"):
            t = s[role]
            lines.append(
                f"| fleet {role} = {t['name']} x {scale:g} "
                "| derived: the emulator configuration the fleet runs "
                f"| {t['prefill_ms_per_token'] * scale:.4f} | {t['decode_ms_per_token'] * scale:.3f} "
                f"| {t['batch_slowdown']:.4f} | - | - | - |"
            )
    lines.append("")
    return "\n".join(lines)


def update_benchmarks(path: Path, result: Mapping[str, Any], calibration_path: Path | None) -> None:
    """Rewrite the baselines (and, given calibration.json, the calibration) section of BENCHMARKS.md."""
    text = path.read_text()
    text = replace_section(text, "baselines", baselines_section(result))
    if calibration_path is not None:
        text = replace_section(
            text, "calibration", calibration_section(json.loads(calibration_path.read_text()), result)
        )
    path.write_text(text)
