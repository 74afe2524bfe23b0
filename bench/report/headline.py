"""Timelines over a phase, and the headline ratios BENCHMARKS.md quotes (one run, same stream)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bench.report.records import RequestResult
from bench.report.sensitivity import parity_verdict
from bench.report.summary import SystemSummary
from bench.stats import percentile

__all__ = ["headline", "interpolate_at", "timeline"]


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
