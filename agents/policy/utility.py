"""Stage-2 scoring: the utility-model seam, its numpy logistic regression, the threshold tuner.

Pure: no I/O, no clock. The I/O side persists ``UtilityModel.to_dict()`` and feeds ``ThresholdTuner``
with sampled outcomes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from agents.policy.features import FEATURE_NAMES
from infra.protocols import SearchHit

__all__ = ["PAPER_PRIOR_SIMILARITY", "ThresholdTuner", "UtilityModel", "UtilityScorer"]

FloatArray = npt.NDArray[np.float64]
_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}


# ----------------------------------------------------------------------------------------- scoring
@runtime_checkable
class UtilityScorer(Protocol):
    """Anything that rates candidates' utility in [0, 1]: the seam where a cross-encoder plugs in.

    ``features[i]`` is ``candidate_features`` of ``hits[i]``. A model that needs the texts (a
    cross-encoder) reads ``query_text`` and ``hits``; one too heavy for the event loop should be run by
    the agent off the loop beforehand and handed in as a scorer that returns its precomputed scores.
    """

    def score(self, query_text: str, hits: Sequence[SearchHit], features: FloatArray) -> FloatArray: ...


def _training_arrays(
    x: FloatArray, y: npt.ArrayLike, sample_weight: npt.ArrayLike | None, feature_names: Sequence[str]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``fit``'s inputs as float arrays, checked: one column per feature, one 0..1 label and one
    non-negative weight per row, all finite."""
    xr = np.atleast_2d(np.asarray(x, dtype=np.float64))
    yr = np.asarray(y, dtype=np.float64).reshape(-1)
    n, d = xr.shape
    if d != len(feature_names):
        raise ValueError(f"x has {d} columns, expected {len(feature_names)} ({feature_names})")
    if yr.shape[0] != n or n == 0:
        raise ValueError(f"x has {n} rows and y has {yr.shape[0]}; need the same, non-zero number")
    if not (np.all(np.isfinite(xr)) and np.all((yr >= 0) & (yr <= 1))):
        raise ValueError("x must be finite and y must lie in [0, 1]")
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if sw.shape[0] != n or np.any(sw < 0):
        raise ValueError("sample_weight must have one non-negative weight per row")
    return xr, yr, sw


def _sigmoid(z: FloatArray) -> FloatArray:
    out: FloatArray = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    ez = np.exp(z[~positive])
    out[~positive] = ez / (1.0 + ez)
    return out


PAPER_PRIOR_SIMILARITY = 0.8  # the paper: related requests start above cosine 0.8


def _prior_weights(similarity_at_half: float = PAPER_PRIOR_SIMILARITY) -> tuple[FloatArray, float]:
    """The untrained prior: logit = 10*(similarity - s_half) + 4*(quality - 0.5).

    Utility is 0.5 at ``similarity_at_half`` with quality 0.5, rises ~0.23 per +0.1 of similarity
    near there, and a better answer lowers the similarity it needs (quality 0.8 is worth +0.12 of
    similarity). Every other feature starts at 0. The paper's 0.8 is the class default; the serving
    default (``selection.prior_similarity``) is 0.7, where measured helpfulness turns (docs/decisions.md).
    """
    weights = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
    weights[_INDEX["similarity"]] = 10.0
    weights[_INDEX["quality"]] = 4.0
    return weights, -10.0 * similarity_at_half - 4.0 * 0.5


@dataclass
class UtilityModel:
    """Logistic regression over ``candidate_features``: P(example helps the target model).

    ``UtilityModel()`` is the untrained prior (see ``_prior_weights``); ``fit`` replaces it with an
    L2-regularised fit by Newton's method (IRLS) on standardised features, converted back to weights
    on the raw features, so ``predict`` is one dot product and a sigmoid.
    """

    weights: FloatArray = field(default_factory=lambda: _prior_weights()[0])
    bias: float = field(default_factory=lambda: _prior_weights()[1])
    feature_names: tuple[str, ...] = FEATURE_NAMES
    trained_rows: int = 0
    prior_similarity: float = PAPER_PRIOR_SIMILARITY  # the prior that ``fit`` shrinks towards

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)
        if self.weights.shape != (len(self.feature_names),):
            raise ValueError(
                f"weights have shape {self.weights.shape}, expected ({len(self.feature_names)},) "
                f"for features {self.feature_names}"
            )

    @classmethod
    def default(cls) -> UtilityModel:
        """The untrained prior at the paper's similarity (same as ``UtilityModel()``)."""
        return cls()

    @classmethod
    def prior(cls, similarity_at_half: float) -> UtilityModel:
        """The untrained prior, 0.5 at ``similarity_at_half`` for an answer of quality 0.5."""
        weights, bias = _prior_weights(similarity_at_half)
        return cls(weights=weights, bias=bias, prior_similarity=similarity_at_half)

    def predict(self, features: FloatArray) -> FloatArray:
        """Utility in [0, 1]: one value per row of ``features`` (or a 1-element array for one row)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        return _sigmoid(x @ self.weights + self.bias)

    def score(self, query_text: str, hits: Sequence[SearchHit], features: FloatArray) -> FloatArray:
        return self.predict(features)

    def fit(
        self,
        x: FloatArray,
        y: npt.ArrayLike,
        sample_weight: npt.ArrayLike | None = None,
        *,
        l2: float = 10.0,
        shrink_to_prior: bool = True,
        max_iter: int = 100,
        tol: float = 1e-8,
    ) -> UtilityModel:
        """Fit in place and return self. ``y`` is 0/1 (or a probability); ``l2`` as sklearn's ``1/C``
        (the default 10 makes the prior worth roughly ten observations: negligible past a few hundred).

        Minimises ``sum_i w_i * logloss_i + l2/2 * |beta - beta_0|^2`` over standardised features,
        where ``beta_0`` is the untrained prior (``shrink_to_prior``, the default: with little feedback
        the model stays near the prior and keeps its monotonicity) or zero (plain ridge). The
        intercept gets ``l2 * 1e-3`` so that all-positive or all-negative data still converge.
        Newton steps with backtracking: ~10 iterations, milliseconds for thousands of rows.
        """
        xr, yr, sw = _training_arrays(x, y, sample_weight, self.feature_names)
        n, d = xr.shape
        mean = xr.mean(axis=0)
        scale = xr.std(axis=0)
        scale[scale < 1e-12] = 1.0
        z = np.hstack([(xr - mean) / scale, np.ones((n, 1))])
        penalty = np.full(d + 1, l2)
        penalty[-1] = l2 * 1e-3
        centre = np.zeros(d + 1)
        if shrink_to_prior and self.feature_names == FEATURE_NAMES:
            prior_w, prior_b = _prior_weights(self.prior_similarity)
            centre[:d] = prior_w * scale  # the prior, expressed on standardised features
            centre[d] = prior_b + float(np.sum(prior_w * mean))
        beta = centre.copy()

        def objective(b: FloatArray) -> float:
            logits = z @ b
            # log(1 + e^t) - y*t, stably
            loss = np.logaddexp(0.0, logits) - yr * logits
            return float(sw @ loss + 0.5 * penalty @ ((b - centre) ** 2))

        current = objective(beta)
        for _ in range(max_iter):
            p = _sigmoid(z @ beta)
            grad = z.T @ (sw * (p - yr)) + penalty * (beta - centre)
            hess = (z * (sw * p * (1.0 - p))[:, None]).T @ z + np.diag(penalty)
            step = np.linalg.solve(hess, grad)
            t = 1.0
            while True:
                candidate = beta - t * step
                value = objective(candidate)
                if value <= current or t < 1e-6:
                    break
                t *= 0.5
            beta, current = candidate, value
            if np.max(np.abs(t * step)) < tol:
                break

        self.weights = beta[:d] / scale
        self.bias = float(beta[d] - np.sum(beta[:d] * mean / scale))
        self.trained_rows = n
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state; ``from_dict`` refuses state written for other features."""
        return {
            "kind": "logistic",
            "version": 1,
            "feature_names": list(self.feature_names),
            "weights": [float(w) for w in self.weights],
            "bias": float(self.bias),
            "trained_rows": int(self.trained_rows),
            "prior_similarity": float(self.prior_similarity),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UtilityModel:
        names = tuple(data.get("feature_names", ()))
        if data.get("kind") != "logistic" or names != FEATURE_NAMES:
            raise ValueError(
                f"utility model state is for kind={data.get('kind')!r} features={names}; this code reads "
                f"kind='logistic' features={FEATURE_NAMES}: retrain or start from UtilityModel()"
            )
        return cls(
            weights=np.asarray(data["weights"], dtype=np.float64),
            bias=float(data["bias"]),
            feature_names=names,
            trained_rows=int(data.get("trained_rows", 0)),
            prior_similarity=float(data.get("prior_similarity", PAPER_PRIOR_SIMILARITY)),
        )


# --------------------------------------------------------------------------------------- threshold
@dataclass
class ThresholdTuner:
    """Re-tunes the utility threshold from a sliding window of sampled outcomes.

    Each observation is (utility the scorer predicted for an example, whether the reply that used it
    was judged good). ``tune`` picks, among the midpoints between observed utilities and the bounds,
    the threshold that maximises ``objective`` over the window if examples at or above it were kept:

    * ``"f1"``: F1 of "kept" against "good";
    * ``"gain"``: (good kept) - ``bad_cost`` * (bad kept): keep an example when P(good) beats
      ``bad_cost / (1 + bad_cost)`` (0.5 by default).

    Ties go to the candidate nearest the current threshold, then to the lower one: deterministic and
    slow to wobble. The result is clamped to [floor, ceiling] and moves at most ``max_step`` per call.
    Below ``min_samples`` observations the threshold stays where it is.
    """

    threshold: float = 0.5
    floor: float = 0.2
    ceiling: float = 0.9
    window: int = 2000
    min_samples: int = 50
    max_step: float = 0.1
    objective: Literal["f1", "gain"] = "f1"
    bad_cost: float = 1.0
    _samples: deque[tuple[float, bool]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= self.ceiling <= 1.0:
            raise ValueError(
                f"need 0 <= floor <= ceiling <= 1, got floor={self.floor} ceiling={self.ceiling}"
            )
        if self.window < 1 or self.max_step < 0:
            raise ValueError(f"need window >= 1 and max_step >= 0, got {self.window} and {self.max_step}")
        self._samples = deque(maxlen=self.window)
        self.threshold = min(max(self.threshold, self.floor), self.ceiling)

    def __len__(self) -> int:
        return len(self._samples)

    def observe(self, utility: float, good: bool) -> None:
        if math.isfinite(utility):
            self._samples.append((min(max(utility, 0.0), 1.0), bool(good)))

    def tune(self) -> float:
        """Move the threshold toward the window's best and return it."""
        if len(self._samples) < self.min_samples:
            return self.threshold
        data = np.asarray(self._samples, dtype=np.float64)
        order = np.argsort(-data[:, 0], kind="stable")
        utilities, good = data[order, 0], data[order, 1]
        distinct = np.unique(utilities)
        candidates = np.concatenate(([self.floor, self.ceiling], (distinct[:-1] + distinct[1:]) / 2.0))
        candidates = np.unique(np.clip(candidates, self.floor, self.ceiling))
        # kept(t) = the k(t) highest utilities, those >= t
        kept = np.searchsorted(-utilities, -candidates, side="right")
        good_cum = np.concatenate(([0.0], np.cumsum(good)))
        tp = good_cum[kept]
        fp = kept - tp
        if self.objective == "f1":
            fn = good_cum[-1] - tp
            denominator = 2 * tp + fp + fn
            value = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        else:
            value = tp - self.bad_cost * fp
        best = float(np.max(value))
        ties = candidates[np.isclose(value, best, rtol=0.0, atol=1e-12)]
        target = float(min(ties, key=lambda t: (abs(t - self.threshold), t)))
        step = min(max(target - self.threshold, -self.max_step), self.max_step)
        self.threshold = min(max(self.threshold + step, self.floor), self.ceiling)
        return self.threshold
