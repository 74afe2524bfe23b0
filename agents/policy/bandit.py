"""The router's learner: the bandit context of one request and a LinUCB bandit over model tiers.

Pure: no I/O, no clock. The I/O side checkpoints ``LinUCBBandit.to_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from agents.policy.features import estimate_tokens
from agents.policy.retrieval import Selected
from infra.protocols import Vector
from infra.settings import BackendSettings, RoutingSettings

__all__ = [
    "CONTEXT_DIM",
    "CONTEXT_NAMES",
    "EXAMPLES_SCALE",
    "PROJECTION_SEED",
    "ArmEstimate",
    "LinUCBBandit",
    "MeasuredPrior",
    "context_features",
    "tier_priors",
    "without_examples",
]

FloatArray = npt.NDArray[np.float64]


# ----------------------------------------------------------------------------------------- context
PROJECTION_DIM = 8
PROJECTION_SEED = 20250121  # fixed: a checkpointed bandit is only valid with the same projection
EXAMPLES_SCALE = 5.0  # the paper's examples use up to 5; feature = count / 5
_SUMMARY_NAMES = (
    "bias",
    "examples",  # number of selected examples / EXAMPLES_SCALE
    "max_similarity",
    "mean_similarity",
    "max_utility",
    "mean_utility",
    "mean_quality",
    "prompt_length",  # floor(log2(1 + prompt tokens)) / 12, capped at 1: ~1, 2, 4, ... 4096 tokens
)
CONTEXT_NAMES: tuple[str, ...] = _SUMMARY_NAMES + tuple(f"query_{i}" for i in range(PROJECTION_DIM))
CONTEXT_DIM = len(CONTEXT_NAMES)
_EXAMPLES_INDEX = CONTEXT_NAMES.index("examples")
_MAX_UTILITY_INDEX = CONTEXT_NAMES.index("max_utility")
_EXAMPLE_SLOTS = slice(_EXAMPLES_INDEX, CONTEXT_NAMES.index("mean_quality") + 1)  # what examples set


@lru_cache(maxsize=8)
def _projection(dim: int, out_dim: int, seed: int) -> FloatArray:
    """A fixed Gaussian random projection (Johnson-Lindenstrauss), scaled so a unit vector maps to
    roughly unit length. Deterministic in (dim, out_dim, seed); read-only because it is cached."""
    matrix = np.random.default_rng(seed).standard_normal((dim, out_dim)) / math.sqrt(out_dim)
    matrix.setflags(write=False)
    return matrix


def context_features(
    query: Vector, selected: Sequence[Selected], *, prompt_tokens: int | None = None, prompt_text: str = ""
) -> FloatArray:
    """The bandit's context for one request, in ``CONTEXT_NAMES`` order (``CONTEXT_DIM`` values).

    The prompt length comes from ``prompt_tokens`` when given, else from ``estimate_tokens(prompt_text)``.
    The query part is a fixed seeded random projection of the unit query embedding to 8 dims: enough
    for the bandit to tell broad topics apart, small enough for a 16x16 ridge regression per tier.
    """
    n = len(selected)
    x = np.zeros(CONTEXT_DIM, dtype=np.float64)
    x[0] = 1.0
    x[1] = n / EXAMPLES_SCALE
    if n:
        similarities = [s.similarity for s in selected]
        utilities = [s.utility for s in selected]
        x[2], x[3] = max(similarities), sum(similarities) / n
        x[4], x[5] = max(utilities), sum(utilities) / n
        x[6] = sum(min(max(s.example.quality, 0.0), 1.0) for s in selected) / n
    tokens = prompt_tokens if prompt_tokens is not None else estimate_tokens(prompt_text)
    x[7] = min(math.floor(math.log2(1 + max(tokens, 0))) / 12.0, 1.0)
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(q))
    if q.size and norm > 0 and math.isfinite(norm):
        x[len(_SUMMARY_NAMES) :] = (q / norm) @ _projection(q.size, PROJECTION_DIM, PROJECTION_SEED)
    return x


def without_examples(x: FloatArray) -> FloatArray:
    """The context of the same request served without its examples: the example summary (count,
    similarities, utilities, quality) zeroed, the bias, prompt length and query projection kept."""
    out = np.array(x, dtype=np.float64, copy=True).reshape(-1)
    if out.shape == (CONTEXT_DIM,):
        out[_EXAMPLE_SLOTS] = 0.0
    return out


# ------------------------------------------------------------------------------------------ bandit
@dataclass(frozen=True, slots=True)
class MeasuredPrior:
    """One tier's measured quality on the router's reward scale: ``alone`` (no examples) and
    ``with_examples`` (shown the examples its selection picked), e.g. from ``agents/policy/priors.json``."""

    alone: float
    with_examples: float


@dataclass(frozen=True, slots=True)
class ArmEstimate:
    """Expected quality of one tier for one context (clipped to [0, 1]) and its confidence width."""

    mean: float
    width: float


@dataclass
class _Arm:
    a: FloatArray  # ridge * I + sum x x^T
    b: FloatArray  # sum (reward - prior) x
    n: int = 0
    a_inv: FloatArray = field(init=False)
    theta: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self.a_inv = np.asarray(np.linalg.inv(self.a), dtype=np.float64)
        self.theta = self.a_inv @ self.b


class LinUCBBandit:
    """LinUCB (disjoint arms) over model tiers, learning the residual over a per-tier prior.

    For tier ``i`` and context ``x``: ``mean_i(x) = prior_i(x) + x . theta_i`` where ``theta_i`` is the
    ridge-regression fit of ``reward - prior_i(x)`` on the contexts seen for that tier, and
    ``width_i(x) = sqrt(x^T A_i^-1 x)``. With no feedback ``mean = prior`` and ``width`` is widest;
    ``ridge`` is how many pseudo-observations the prior is worth.

    ``prior_i(x)`` is ``priors[i]`` (the tier alone) for a context without examples; with examples
    it moves toward the tier's quality with examples (``example_priors[i]``, measured; unmeasured
    tiers: the large tier's prior for other tiers, no change for the large tier) by the best
    example's utility (see ``prior``); clipped to [0, 1]. The example count is read back from the
    context, so ``update`` needs only the context that ``expected`` saw, and the same tier is
    estimated with and without its examples by passing ``without_examples(x)``.
    """

    def __init__(
        self,
        priors: Mapping[str, float],
        *,
        dim: int = CONTEXT_DIM,
        ridge: float = 1.0,
        large_tier: str = "large",
        example_boost: float = 0.1,
        thompson_scale: float = 0.3,
        example_priors: Mapping[str, float] | None = None,
    ) -> None:
        if not priors:
            raise ValueError("a bandit needs at least one arm (tier); got no priors")
        if ridge <= 0 or dim < 1:
            raise ValueError(f"need ridge > 0 and dim >= 1, got ridge={ridge} dim={dim}")
        self.dim = dim
        self.ridge = ridge
        self.large_tier = large_tier
        self.example_boost = example_boost
        self.thompson_scale = thompson_scale
        self.priors = {tier: float(p) for tier, p in priors.items()}
        self.example_priors = {t: float(p) for t, p in (example_priors or {}).items() if t in self.priors}
        self._arms = {tier: self._fresh_arm() for tier in self.priors}

    @classmethod
    def from_settings(
        cls,
        backends: Sequence[BackendSettings],
        routing: RoutingSettings,
        *,
        large_tier: str,
        measured: Mapping[str, MeasuredPrior] | None = None,
        **kwargs: Any,
    ) -> LinUCBBandit:
        """One arm per configured tier, its priors from ``tier_priors(backends, measured)``."""
        priors, example_priors = tier_priors(backends, measured or {})
        return cls(
            priors,
            large_tier=large_tier,
            example_boost=routing.example_boost,
            example_priors=example_priors,
            **kwargs,
        )

    def _fresh_arm(self) -> _Arm:
        return _Arm(a=self.ridge * np.eye(self.dim), b=np.zeros(self.dim))

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(self._arms)

    def observations(self, tier: str) -> int:
        return self._arm(tier).n

    def _arm(self, tier: str) -> _Arm:
        try:
            return self._arms[tier]
        except KeyError:
            raise KeyError(f"unknown tier {tier!r}; the bandit's tiers are {sorted(self._arms)}") from None

    def _check(self, x: FloatArray) -> FloatArray:
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        if v.shape != (self.dim,) or not np.all(np.isfinite(v)):
            raise ValueError(f"context must be {self.dim} finite numbers, got shape {v.shape}")
        return v

    def _example_target(self, tier: str) -> float:
        """What ``tier`` is expected to reach with fully useful examples."""
        if tier in self.example_priors:
            return self.example_priors[tier]
        base = self.priors[tier]
        if tier == self.large_tier:
            return base  # unmeasured: the large tier is assumed not to need examples
        return max(base, self.priors.get(self.large_tier, base))

    def prior(self, tier: str, x: FloatArray) -> float:
        """A tier's expected quality before any feedback.

        With examples in ``x``, the prior moves from the tier alone toward ``_example_target`` in
        proportion to the best example's utility (the paper's observation: a small model shown a
        near-duplicate request's large-model answer answers about as well as the large model; a
        measured ``example_priors`` entry replaces that assumption, and may be lower than the tier
        alone when examples were measured to hurt), plus ``example_boost`` for each further example
        when examples help the tier. Feedback then corrects it per context.
        """
        base = self.priors[tier]
        if self.dim == CONTEXT_DIM:
            n = round(float(x[_EXAMPLES_INDEX]) * EXAMPLES_SCALE)
            gain = self._example_target(tier) - base
            if n > 0 and (gain != 0.0 or tier != self.large_tier):
                utility = min(max(float(x[_MAX_UTILITY_INDEX]), 0.0), 1.0)
                base += gain * utility + (self.example_boost * (n - 1) if gain >= 0.0 else 0.0)
        return min(max(base, 0.0), 1.0)

    def _raw(self, tier: str, v: FloatArray) -> tuple[float, float]:
        arm = self._arms[tier]
        mean = self.prior(tier, v) + float(v @ arm.theta)
        width = math.sqrt(max(float(v @ arm.a_inv @ v), 0.0))
        return mean, width

    def expected(self, x: FloatArray) -> dict[str, ArmEstimate]:
        v = self._check(x)
        out: dict[str, ArmEstimate] = {}
        for tier in self._arms:
            mean, width = self._raw(tier, v)
            out[tier] = ArmEstimate(mean=min(max(mean, 0.0), 1.0), width=width)
        return out

    def update(self, tier: str, x: FloatArray, reward: float) -> None:
        """Fold in one observed reward (reply quality in [0, 1]) for ``tier`` at context ``x``."""
        v = self._check(x)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be a finite number in [0, 1], got {reward}")
        arm = self._arm(tier)
        residual = min(max(reward, 0.0), 1.0) - self.prior(tier, v)
        arm.a += np.outer(v, v)
        arm.b += residual * v
        arm.n += 1
        arm.refresh()

    def sample(self, x: FloatArray, rng: np.random.Generator) -> dict[str, float]:
        """One Thompson draw per tier: ``N(mean, (thompson_scale * width)^2)``, unclipped.

        This is the marginal at ``x`` of LinTS's posterior ``theta ~ N(theta_hat, s^2 A^-1)``.
        """
        v = self._check(x)
        out: dict[str, float] = {}
        for tier in self._arms:
            mean, width = self._raw(tier, v)
            out[tier] = float(rng.normal(mean, self.thompson_scale * width))
        return out

    def thompson_tier(
        self, x: FloatArray, *, rng: np.random.Generator, exclude: Set[str] = frozenset()
    ) -> str | None:
        """The second arm to collect feedback on: the Thompson-sampled best tier outside ``exclude``
        (pass the tier already chosen, and tiers with nothing to serve). None if no tier is left."""
        draws = {t: s for t, s in self.sample(x, rng).items() if t not in exclude}
        return max(sorted(draws), key=lambda t: draws[t]) if draws else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "linucb",
            "version": 1,
            "dim": self.dim,
            "ridge": self.ridge,
            "large_tier": self.large_tier,
            "example_boost": self.example_boost,
            "thompson_scale": self.thompson_scale,
            "projection_seed": PROJECTION_SEED,
            "priors": dict(self.priors),
            "example_priors": dict(self.example_priors),
            "arms": {
                t: {"a": arm.a.tolist(), "b": arm.b.tolist(), "n": arm.n} for t, arm in self._arms.items()
            },
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        priors: Mapping[str, float] | None = None,
        example_boost: float | None = None,
        example_priors: Mapping[str, float] | None = None,
    ) -> LinUCBBandit:
        """Restore a checkpoint. With ``priors`` (the current configuration) the arms follow it: tiers
        new to the configuration start fresh, tiers no longer configured are dropped, and the priors
        (and ``example_boost`` and ``example_priors`` if given) are the new ones."""
        if data.get("kind") != "linucb" or data.get("projection_seed") != PROJECTION_SEED:
            raise ValueError(
                f"bandit state is kind={data.get('kind')!r} projection_seed={data.get('projection_seed')!r}; "
                f"this code reads kind='linucb' projection_seed={PROJECTION_SEED}: start a fresh bandit"
            )
        bandit = cls(
            priors if priors is not None else data["priors"],
            dim=int(data["dim"]),
            ridge=float(data["ridge"]),
            large_tier=str(data["large_tier"]),
            example_boost=float(data["example_boost"] if example_boost is None else example_boost),
            thompson_scale=float(data.get("thompson_scale", 0.3)),
            example_priors=example_priors if example_priors is not None else data.get("example_priors", {}),
        )
        for tier, state in data["arms"].items():
            if tier in bandit._arms:
                a = np.asarray(state["a"], dtype=np.float64)
                b = np.asarray(state["b"], dtype=np.float64)
                if a.shape != (bandit.dim, bandit.dim) or b.shape != (bandit.dim,):
                    raise ValueError(
                        f"arm {tier!r} has shapes {a.shape}, {b.shape}; expected dim {bandit.dim}"
                    )
                bandit._arms[tier] = _Arm(a=a, b=b, n=int(state["n"]))
        return bandit


def tier_priors(
    backends: Sequence[BackendSettings], measured: Mapping[str, MeasuredPrior]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per configured tier: its prior alone, and (measured tiers only) its prior with examples.

    A tier takes its ``measured`` values unless one of its backends sets ``quality_prior``
    explicitly (settings win over the shipped file); otherwise its prior is the mean
    ``quality_prior`` of its backends and it gets no ``example_priors`` entry.
    """
    by_tier: dict[str, list[float]] = {}
    explicit: set[str] = set()
    for b in backends:
        by_tier.setdefault(b.tier, []).append(0.5 if b.quality_prior is None else b.quality_prior)
        if b.quality_prior is not None:  # survives child_env's JSON, unlike model_fields_set
            explicit.add(b.tier)
    priors = {tier: sum(v) / len(v) for tier, v in by_tier.items()}
    example_priors: dict[str, float] = {}
    for tier in priors:
        if tier in measured and tier not in explicit:
            priors[tier] = measured[tier].alone
            example_priors[tier] = measured[tier].with_examples
    return priors, example_priors
