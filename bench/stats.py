"""The benchmarks' statistics, in one place: percentiles, latency summaries, bootstrap intervals.

* ``percentile(values, q)``: linear interpolation (numpy's default), ``q`` in 0..100, NaN for none;
  ``method="nearest"`` is the upper nearest rank ``sorted(values)[min(n - 1, int(q / 100 * n))]``,
  which the soak, stack-timings and dev-TGI benchmarks have always reported (kept so that their
  numbers stay comparable across runs).
* ``summary(values)``: ``{"n", "p50", "p99", "mean"}`` (linear), the overhead benchmark's shape.
* ``mean_ci(values)``: the mean and that interval together (one value: its own interval).
* ``bootstrap_ci(values)``: seeded percentile-bootstrap interval of a mean (``agents.policy.scoring``'s,
  re-exported so that routing and the benchmarks cannot disagree); ``paired_bootstrap_ci(a, b)``: the
  same for the mean paired difference ``a - b``.
* ``wilson_interval``: the Wilson score interval of a proportion (re-exported from the same module).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from agents.policy.scoring import bootstrap_ci, wilson_interval

__all__ = ["bootstrap_ci", "mean_ci", "paired_bootstrap_ci", "percentile", "summary", "wilson_interval"]

FloatArray = npt.NDArray[np.float64]


def percentile(
    values: Sequence[float] | FloatArray, q: float, *, method: Literal["linear", "nearest"] = "linear"
) -> float:
    """The ``q``-th percentile (``q`` in 0..100) of ``values``; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if len(values) == 0:
        return math.nan
    if method == "nearest":
        ordered = sorted(float(v) for v in values)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary(values: Sequence[float]) -> dict[str, float]:
    """Count, p50, p99 and mean (NaN percentiles and mean for no values)."""
    mean = float(np.mean(values)) if len(values) else math.nan
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "mean": mean}


def paired_bootstrap_ci(
    a: Sequence[float] | FloatArray,
    b: Sequence[float] | FloatArray,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean paired difference ``a - b`` (same requests, same order)."""
    va, vb = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if va.shape != vb.shape:
        raise ValueError(f"paired samples differ in size: {va.size} and {vb.size}")
    return bootstrap_ci(va - vb, confidence=confidence, resamples=resamples, seed=seed)


def mean_ci(values: Sequence[float] | FloatArray, *, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """The mean of ``values`` and its seeded 95% bootstrap interval (a single value is its own interval)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("mean of no values is undefined")
    low, high = bootstrap_ci(v, seed=seed) if v.size > 1 else (float(v[0]), float(v[0]))
    return float(v.mean()), (float(low), float(high))
