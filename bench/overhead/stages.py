"""Per-stage statistics: from the replies' ``timings_ms`` and from the worker's ``echolm_stage_seconds``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from bench.overhead.config import TIMING_STAGES
from bench.stats import percentile, summary
from echolm.client import Reply

__all__ = ["analyse", "scrape_stages", "stage_deltas"]


def _histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus-style quantile from cumulative (le, count) buckets, linear inside a bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            share = (rank - prev_count) / max(count - prev_count, 1e-12)
            return prev_le + (le - prev_le) * share
        prev_le, prev_count = le, count
    return prev_le


def scrape_stages(port: int) -> dict[str, dict[str, Any]]:
    """``echolm_stage_seconds`` per stage: cumulative buckets, sum and count."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "echolm_stage_seconds":
            continue
        for sample in family.samples:
            stage = out.setdefault(sample.labels["stage"], {"buckets": {}, "sum": 0.0, "count": 0.0})
            if sample.name.endswith("_bucket"):
                stage["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                stage["sum"] = sample.value
            elif sample.name.endswith("_count"):
                stage["count"] = sample.value
    return out


def stage_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per-stage mean/p50/p99 (ms) of what the worker observed between two scrapes."""
    out: dict[str, dict[str, float]] = {}
    for stage, now in after.items():
        then = before.get(stage, {"buckets": {}, "sum": 0.0, "count": 0.0})
        count = now["count"] - then["count"]
        if count <= 0:
            continue
        buckets = sorted((le, c - then["buckets"].get(le, 0.0)) for le, c in now["buckets"].items())
        out[stage] = {
            "n": count,
            "mean": 1000 * (now["sum"] - then["sum"]) / count,
            "p50": 1000 * _histogram_quantile(buckets, 0.5),
            "p99": 1000 * _histogram_quantile(buckets, 0.99),
        }
    return out


def analyse(replies: Sequence[Reply], elapsed_s: float) -> dict[str, Any]:
    ok = [r for r in replies if r.ok]
    stages = {s: summary([r.timings_ms[s] for r in ok if s in r.timings_ms]) for s in TIMING_STAGES}
    e2e = [r.latency_s * 1000 for r in ok]
    overhead = [r.latency_s * 1000 - r.timings_ms.get("generate", 0.0) for r in ok]
    rest = [
        r.latency_s * 1000 - sum(r.timings_ms.get(s, 0.0) for s in TIMING_STAGES) for r in ok
    ]  # client->prepare hop, batch wait, reply+log send, reply hop back
    batches = Counter(
        (r.worker, r.timings_ms.get("parse"), r.timings_ms.get("embed"), r.timings_ms.get("retrieve"))
        for r in ok
    )
    sizes = list(batches.values())
    return {
        "replies": len(replies),
        "errors": Counter(r.error_code for r in replies if not r.ok),
        "replies_per_s": len(ok) / elapsed_s if elapsed_s > 0 else float("nan"),
        "stages_ms": stages,
        "end_to_end_ms": summary(e2e),
        "overhead_ms": summary(overhead),
        "unattributed_ms": summary(rest),
        "examples_per_request": float(np.mean([r.n_examples for r in ok])) if ok else 0.0,
        "tiers": Counter(r.tier for r in ok),
        "embed_batches": {
            "count": len(sizes),
            "mean": float(np.mean(sizes)) if sizes else 0.0,
            "p50": percentile(sizes, 50),
            "max": max(sizes, default=0),
            "histogram": dict(sorted(Counter(sizes).items())),
        },
    }
