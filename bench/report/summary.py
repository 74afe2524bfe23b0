"""One system's records of one phase, aggregated: throughput, sustained rate, latency, quality, offload."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench.report.records import RequestResult
from bench.stats import mean_ci, percentile

__all__ = ["SystemSummary", "requality", "summaries_to_json", "summarize", "sustained_rate"]


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
    quality, ci = mean_ci(qualities)
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
        quality=quality,
        quality_ci=ci,
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


def summaries_to_json(summaries: Mapping[str, Mapping[str, SystemSummary]]) -> dict[str, Any]:
    return {p: {n: asdict(s) for n, s in group.items()} for p, group in summaries.items()}
