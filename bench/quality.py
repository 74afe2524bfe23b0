"""Shared helpers for the quality benchmarks: reference scoring and paired comparisons.

The statistics are the policy module's (``agents.policy.scoring``): ``bootstrap_ci`` for means,
``outcomes``/``wilson_interval`` for win rates. What this module adds is their benchmark shape:

* ``ReferenceScorer``: ``reference_score`` (embedding cosine and token F1 against a reference answer,
  equal weights) for many answers at once, with the embeddings batched;
* ``compare``: a paired comparison of two conditions on the same requests: the win rate of A over B
  (a difference within ``tie`` counts half, like the paper's judge ties), its Wilson interval, and
  the mean paired difference with a bootstrap interval;
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agents.policy.scoring import outcomes, reference_score, token_f1
from bench.stats import bootstrap_ci, wilson_interval
from infra.protocols import Embedder

__all__ = ["ReferenceScorer", "Scored", "compare", "summarize"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Scored:
    score: float  # reference_score in [0, 1]
    cosine: float
    f1: float


class ReferenceScorer:
    """``reference_score(cos(answer, reference), token_f1(answer, reference))`` for pairs of texts."""

    def __init__(self, embedder: Embedder, weights: tuple[float, float] = (0.5, 0.5)) -> None:
        self.embedder = embedder
        self.weights = weights

    async def score(self, answers: Sequence[str], references: Sequence[str]) -> list[Scored]:
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers for {len(references)} references")
        if not answers:
            return []
        texts = sorted({*answers, *references})
        index = {t: i for i, t in enumerate(texts)}
        vectors = np.asarray(await self.embedder.embed(texts), dtype=np.float64)
        out = []
        for answer, reference in zip(answers, references, strict=True):
            if not answer.strip():
                out.append(Scored(0.0, 0.0, 0.0))
                continue
            cos = float(vectors[index[answer]] @ vectors[index[reference]])
            f1 = token_f1(answer, reference)
            out.append(Scored(reference_score(cos, f1, self.weights), cos, f1))
        return out


def summarize(values: Sequence[float] | FloatArray, *, seed: int = 0) -> dict[str, float]:
    """Mean and 95% percentile-bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(v, seed=seed)
    return {"mean": float(v.mean()), "ci_low": low, "ci_high": high, "n": int(v.size)}


def compare(
    a: Sequence[float] | FloatArray, b: Sequence[float] | FloatArray, *, tie: float, seed: int = 0
) -> dict[str, float]:
    """A against B, paired by request: win rate of A (``|a - b| <= tie`` is half a win), its Wilson 95%
    interval, the counts, the mean difference ``a - b`` with a bootstrap interval, and ``mean(a)/mean(b)``."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if va.shape != vb.shape or va.size == 0:
        raise ValueError(f"need two equal, non-empty samples, got {va.shape} and {vb.shape}")
    diff = va - vb
    per = outcomes(diff, tie=tie)
    wins, ties = float(np.sum(per == 1.0)), float(np.sum(per == 0.5))
    low, high = wilson_interval(wins + ties / 2, int(diff.size))
    d_low, d_high = bootstrap_ci(diff, seed=seed)
    mean_b = float(vb.mean())
    return {
        "win_rate": float(per.mean()),
        "win_ci_low": low,
        "win_ci_high": high,
        "wins": wins,
        "ties": ties,
        "losses": float(diff.size) - wins - ties,
        "mean_diff": float(diff.mean()),
        "diff_ci_low": d_low,
        "diff_ci_high": d_high,
        "ratio": float(va.mean()) / mean_b if mean_b > 0 else float("nan"),
    }
