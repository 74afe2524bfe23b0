"""Paired statistics for the quality evaluation: win rate with a tie margin, paired bootstrap, Holm.

All pure numpy (and one exact binomial tail). A *paired* sample is two scores per request, condition
A and condition B on the same request; every statistic here resamples requests, never scores alone.

* ``outcomes``: per request, 1 (A wins: ``a - b > margin``), 0.5 (tie: ``|a - b| <= margin``) or
  0 (B wins);
* ``paired_bootstrap``: mean of A, mean of B, the mean difference and the win rate, each with a
  percentile 95% interval from the same ``n_boot`` resamples of requests;
* ``sign_test_p``: two-sided exact sign test on the non-tied pairs (H0: A and B equally likely to win);
* ``holm``: Holm's step-down adjustment of a family of p-values (monotone, capped at 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "PairedResult",
    "holm",
    "outcomes",
    "paired_bootstrap",
    "reweighted_mean",
    "sign_test_p",
    "win_rate",
]

FloatArray = npt.NDArray[np.float64]


def outcomes(
    a: Sequence[float] | FloatArray, b: Sequence[float] | FloatArray, *, margin: float
) -> FloatArray:
    """1 where A beats B by more than ``margin``, 0 where B beats A by more, 0.5 otherwise (a tie)."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if va.shape != vb.shape or va.ndim != 1:
        raise ValueError(f"need two paired 1-d samples of one length, got shapes {va.shape} and {vb.shape}")
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"the tie margin must be a finite number >= 0, got {margin}")
    diff = va - vb
    out = np.full(diff.shape, 0.5)
    out[diff > margin] = 1.0
    out[diff < -margin] = 0.0
    return out


def win_rate(a: Sequence[float] | FloatArray, b: Sequence[float] | FloatArray, *, margin: float) -> float:
    """Share of requests A wins, ties counting half."""
    per = outcomes(a, b, margin=margin)
    if per.size == 0:
        raise ValueError("no paired requests")
    return float(per.mean())


@dataclass(frozen=True, slots=True)
class PairedResult:
    n: int
    mean_a: float
    mean_b: float
    mean_a_ci: tuple[float, float]
    mean_b_ci: tuple[float, float]
    diff: float
    diff_ci: tuple[float, float]
    win_rate: float
    win_ci: tuple[float, float]
    wins: int
    ties: int
    losses: int
    p_sign: float

    def as_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "mean_a": self.mean_a,
            "mean_a_ci": list(self.mean_a_ci),
            "mean_b": self.mean_b,
            "mean_b_ci": list(self.mean_b_ci),
            "diff": self.diff,
            "diff_ci": list(self.diff_ci),
            "win_rate": self.win_rate,
            "win_ci": list(self.win_ci),
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "p_sign": self.p_sign,
        }


def _interval(samples: FloatArray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float] | FloatArray,
    b: Sequence[float] | FloatArray,
    *,
    margin: float,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedResult:
    """Means, mean difference ``a - b`` and win rate of A over B, with percentile intervals from
    ``n_boot`` resamples of the requests (the same resample for every statistic)."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    per = outcomes(va, vb, margin=margin)
    n = int(va.size)
    if n == 0:
        raise ValueError("no paired requests")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot_a, boot_b, boot_w = va[idx].mean(axis=1), vb[idx].mean(axis=1), per[idx].mean(axis=1)
    wins, ties = int(np.sum(per == 1.0)), int(np.sum(per == 0.5))
    return PairedResult(
        n=n,
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        mean_a_ci=_interval(boot_a, level),
        mean_b_ci=_interval(boot_b, level),
        diff=float((va - vb).mean()),
        diff_ci=_interval(boot_a - boot_b, level),
        win_rate=float(per.mean()),
        win_ci=_interval(boot_w, level),
        wins=wins,
        ties=ties,
        losses=n - wins - ties,
        p_sign=sign_test_p(wins, n - wins - ties),
    )


def reweighted_mean(
    per_stratum: Mapping[str, Sequence[float] | FloatArray],
    weights: Mapping[str, float],
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """A post-stratified mean: each stratum's mean weighted by ``weights`` (renormalised over the
    strata that have values), with a percentile interval from ``n_boot`` resamples within each
    stratum. Used to carry a stratified sample's per-bin win rates back to the pool's own mix."""
    strata = [k for k, v in per_stratum.items() if len(v) and weights.get(k, 0.0) > 0.0]
    if not strata:
        raise ValueError("no stratum has both values and a positive weight")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    total = sum(weights[k] for k in strata)
    rng = np.random.default_rng(seed)
    point, boot = 0.0, np.zeros(n_boot)
    for k in strata:
        values = np.asarray(per_stratum[k], dtype=np.float64)
        w = weights[k] / total
        point += w * float(values.mean())
        idx = rng.integers(0, values.size, size=(n_boot, values.size))
        boot += w * values[idx].mean(axis=1)
    return point, _interval(boot, level)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` successes in ``wins + losses`` fair coin flips."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    # P(X <= k) for X ~ Bin(n, 1/2), summed in log space so large n does not underflow
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values: sort ascending, multiply the i-th (0-based) by ``m - i``, then carry the
    running maximum so the adjusted values keep the raw order; cap at 1."""
    for name, p in p_values.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of {name!r} is {p}, outside [0, 1]")
    order = sorted(p_values, key=lambda name: (p_values[name], name))
    m = len(order)
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        adjusted[name] = running
    return adjusted
