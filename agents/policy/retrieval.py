"""Stage 2 of example selection: score recalled candidates for utility, then pick a combination.

Stage 1 (recall) is the vector store's nearest-neighbour search; this module receives its hits and
decides which of them go in front of the question, in which order. The steps, in order:

1. drop what may not be used: unusable (quarantined) examples, other tenants' examples, repeats of
   one example id, and hits below ``min_similarity``;
2. score the rest with a ``UtilityScorer`` (by default ``UtilityModel``, a numpy logistic regression
   over ``candidate_features``) and drop those below the utility ``threshold``;
3. combine greedily by MMR (utility against redundancy with the examples already kept), dropping
   near-duplicates of kept ones and those that no longer fit the token budget;
4. order the kept ones by utility ascending, so the best example sits last, next to the question.

``ThresholdTuner`` moves the utility threshold from sampled outcomes (predicted utility, whether the
example-assisted reply was judged good). Everything here is pure: no I/O and no clock (``now`` is an
argument, unix seconds like ``Example.created_at``).
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from infra.protocols import Example, SearchHit, Vector

__all__ = [
    "FEATURE_NAMES",
    "SelectionResult",
    "Selected",
    "ThresholdTuner",
    "UtilityModel",
    "UtilityScorer",
    "candidate_features",
    "estimate_tokens",
    "example_token_budget",
    "example_tokens",
    "select_examples",
]

FloatArray = npt.NDArray[np.float64]

# ------------------------------------------------------------------------------------------ tokens
CHARS_PER_TOKEN = 3.5
TURN_OVERHEAD_TOKENS = 8  # chat-template markers around one user/assistant pair (ChatML spends ~10)


def estimate_tokens(text: str) -> int:
    """A deliberately high estimate of the tokens ``text`` costs, without a tokenizer.

    BPE tokenizers of current chat models spend about 4 characters per token on English prose and
    about 3-3.5 on code and digit-heavy text; dividing ASCII characters by 3.5 therefore over-counts
    prose by ~15% and roughly matches code. Characters outside ASCII (CJK, emoji, accented letters)
    are counted one token each, since tokenizers often spend one or more tokens on each of them
    (a character-per-token rate would under-count them badly). Over-counting only costs a slightly
    smaller example budget, while under-counting overflows the small model's context window.

    Its error against the backends' real tokenizers has not been measured here; if a backend
    rejects a prompt as too long, measure before tuning ``CHARS_PER_TOKEN``.
    """
    if not text:
        return 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / CHARS_PER_TOKEN) + (len(text) - ascii_chars)


def example_tokens(example: Example) -> int:
    """What one example costs in the prompt: its request, its response and the turn markers."""
    return estimate_tokens(example.request) + estimate_tokens(example.response) + TURN_OVERHEAD_TOKENS


def example_token_budget(
    *, max_input_tokens: int, prompt_tokens: int, context_fraction: float, reserve_tokens: int = 64
) -> int:
    """Tokens the examples may take: a share of the backend's input window, never crowding the prompt.

    ``context_fraction`` is ``SelectionSettings.context_fraction``; ``reserve_tokens`` covers the
    system prompt and the template around the question.
    """
    room = max_input_tokens - prompt_tokens - reserve_tokens
    return max(0, min(int(max_input_tokens * context_fraction), room))


# ---------------------------------------------------------------------------------------- features
FEATURE_NAMES: tuple[str, ...] = (
    "similarity",  # cosine(query, example request), from the store
    "quality",  # the example's estimated answer quality in [0, 1]
    "from_large",  # 1 if the answer came from the large tier
    "same_tier",  # 1 if the answer came from the tier we are about to prompt
    "log_request_tokens",
    "log_response_tokens",
    "log_age_hours",
    "replay_rounds",
    "length_ratio",  # min/max of query and example-request token estimates, in [0, 1]
    "lexical_overlap",  # Jaccard of lower-cased word sets of query and example request
)
_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
_WORD = re.compile(r"\w+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def _cosine(a: Vector, b: Vector) -> float:
    if a.shape != b.shape or a.size == 0:
        return 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else 0.0


def _features_row(
    query: Vector,
    query_tokens: int,
    query_words: frozenset[str],
    hit: SearchHit,
    *,
    target_tier: str,
    large_tier: str,
    now: float,
) -> list[float]:
    ex = hit.example
    similarity = hit.similarity if math.isfinite(hit.similarity) else _cosine(query, ex.embedding)
    request_tokens = estimate_tokens(ex.request)
    shorter, longer = sorted((query_tokens, request_tokens))
    return [
        float(similarity),
        min(max(float(ex.quality), 0.0), 1.0),
        1.0 if ex.model_tier == large_tier else 0.0,
        1.0 if ex.model_tier == target_tier else 0.0,
        math.log1p(request_tokens),
        math.log1p(estimate_tokens(ex.response)),
        math.log1p(max(0.0, now - ex.created_at) / 3600.0),
        float(ex.replay_rounds),
        shorter / longer if longer else 1.0,
        _jaccard(query_words, _words(ex.request)),
    ]


def candidate_features(
    query: Vector,
    query_text: str,
    hit: SearchHit,
    *,
    target_tier: str,
    now: float,
    large_tier: str = "large",
) -> FloatArray:
    """The stage-2 feature vector of one candidate, in ``FEATURE_NAMES`` order.

    ``hit.similarity`` is used as the similarity; ``query`` is only consulted when the store
    returned no finite similarity (the cosine of the two embeddings is used then).
    """
    row = _features_row(
        query,
        estimate_tokens(query_text),
        _words(query_text),
        hit,
        target_tier=target_tier,
        large_tier=large_tier,
        now=now,
    )
    return np.asarray(row, dtype=np.float64)


# ----------------------------------------------------------------------------------------- scoring
@runtime_checkable
class UtilityScorer(Protocol):
    """Anything that rates candidates' utility in [0, 1]: the seam where a cross-encoder plugs in.

    ``features[i]`` is ``candidate_features`` of ``hits[i]``. A model that needs the texts (a
    cross-encoder) reads ``query_text`` and ``hits``; one too heavy for the event loop should be run by
    the agent off the loop beforehand and handed in as a scorer that returns its precomputed scores.
    """

    def score(self, query_text: str, hits: Sequence[SearchHit], features: FloatArray) -> FloatArray: ...


def _sigmoid(z: FloatArray) -> FloatArray:
    out: FloatArray = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    ez = np.exp(z[~positive])
    out[~positive] = ez / (1.0 + ez)
    return out


def _prior_weights() -> tuple[FloatArray, float]:
    """The untrained prior: logit = 10*(similarity - 0.8) + 4*(quality - 0.5).

    Utility is 0.5 at similarity 0.8 with quality 0.5 (the paper finds > 0.8 is where related requests
    start), rises ~0.23 per +0.1 of similarity near there, and a better answer lowers the similarity
    it needs (quality 0.8 is worth +0.12 of similarity). Every other feature starts at 0.
    """
    weights = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
    weights[_INDEX["similarity"]] = 10.0
    weights[_INDEX["quality"]] = 4.0
    return weights, -10.0 * 0.8 - 4.0 * 0.5


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

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)
        if self.weights.shape != (len(self.feature_names),):
            raise ValueError(
                f"weights have shape {self.weights.shape}, expected ({len(self.feature_names)},) "
                f"for features {self.feature_names}"
            )

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
        l2: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-8,
    ) -> UtilityModel:
        """Fit in place and return self. ``y`` is 0/1 (or a probability); ``l2`` as sklearn's ``1/C``.

        Minimises ``sum_i w_i * logloss_i + l2/2 * |beta|^2`` over standardised features; the
        intercept gets ``l2 * 1e-3`` so that all-positive or all-negative data still converge.
        Newton steps with backtracking: ~10 iterations, milliseconds for thousands of rows.
        """
        xr = np.atleast_2d(np.asarray(x, dtype=np.float64))
        yr = np.asarray(y, dtype=np.float64).reshape(-1)
        n, d = xr.shape
        if d != len(self.feature_names):
            raise ValueError(f"x has {d} columns, expected {len(self.feature_names)} ({self.feature_names})")
        if yr.shape[0] != n or n == 0:
            raise ValueError(f"x has {n} rows and y has {yr.shape[0]}; need the same, non-zero number")
        if not (np.all(np.isfinite(xr)) and np.all((yr >= 0) & (yr <= 1))):
            raise ValueError("x must be finite and y must lie in [0, 1]")
        sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if sw.shape[0] != n or np.any(sw < 0):
            raise ValueError("sample_weight must have one non-negative weight per row")

        mean = xr.mean(axis=0)
        scale = xr.std(axis=0)
        scale[scale < 1e-12] = 1.0
        z = np.hstack([(xr - mean) / scale, np.ones((n, 1))])
        penalty = np.full(d + 1, l2)
        penalty[-1] = l2 * 1e-3
        beta = np.zeros(d + 1)

        def objective(b: FloatArray) -> float:
            logits = z @ b
            # log(1 + e^t) - y*t, stably
            loss = np.logaddexp(0.0, logits) - yr * logits
            return float(sw @ loss + 0.5 * penalty @ (b * b))

        current = objective(beta)
        for _ in range(max_iter):
            p = _sigmoid(z @ beta)
            grad = z.T @ (sw * (p - yr)) + penalty * beta
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
            raise ValueError(f"need 0 <= floor <= ceiling <= 1, got floor={self.floor} ceiling={self.ceiling}")
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


# --------------------------------------------------------------------------------------- selection
@dataclass(frozen=True, slots=True)
class Selected:
    example: Example
    similarity: float
    utility: float


@dataclass(frozen=True, slots=True)
class SelectionResult:
    """The examples to prepend (best last) and how many candidates each rule dropped."""

    selected: tuple[Selected, ...]
    dropped: Mapping[str, int]
    candidates: int

    @property
    def tokens(self) -> int:
        return sum(example_tokens(s.example) for s in self.selected)


DropReason = Literal[
    "other_tenant",
    "repeated_id",
    "unusable",
    "low_similarity",
    "low_utility",
    "near_duplicate",
    "token_budget",
    "max_examples",
]


def _normalised_embeddings(hits: Sequence[SearchHit]) -> FloatArray:
    """Unit rows; a missing or odd-shaped embedding becomes a zero row (similar to nothing)."""
    dims = Counter(h.example.embedding.shape for h in hits)
    dim_shape = dims.most_common(1)[0][0] if dims else (0,)
    dim = dim_shape[0] if len(dim_shape) == 1 else 0
    out = np.zeros((len(hits), dim), dtype=np.float64)
    for i, h in enumerate(hits):
        if h.example.embedding.shape == (dim,):
            out[i] = h.example.embedding
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _normalised_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def select_examples(
    query: Vector,
    query_text: str,
    hits: Sequence[SearchHit],
    *,
    scorer: UtilityScorer,
    threshold: float,
    max_examples: int,
    min_similarity: float,
    duplicate_similarity: float,
    diversity: float,
    token_budget: int,
    target_tier: str,
    now: float,
    large_tier: str = "large",
    tenant: str | None = None,
) -> SelectionResult:
    """Choose and order the in-context examples for one request (see the module docstring).

    MMR: each step keeps the remaining candidate maximising
    ``(1 - diversity) * utility - diversity * max(0, max cosine to the kept examples)``.
    A candidate whose embedding cosine to a kept example is at least ``duplicate_similarity`` (or
    whose request text equals a kept one's) is dropped as a near-duplicate. One that does not fit the
    remaining ``token_budget`` (``example_tokens``) is skipped, and smaller ones may still fill it.
    ``tenant``, when given, drops hits of any other tenant (defence in depth: the store already
    filters by tenant).
    """
    dropped: Counter[str] = Counter()

    def drop(reason: DropReason, count: int = 1) -> None:
        if count:
            dropped[reason] += count

    eligible: list[SearchHit] = []
    seen: set[str] = set()
    for hit in hits:
        ex = hit.example
        if tenant is not None and ex.tenant != tenant:
            drop("other_tenant")
        elif ex.example_id in seen:
            drop("repeated_id")
        elif not ex.usable:
            drop("unusable")
        elif not hit.similarity >= min_similarity:  # NaN fails too
            drop("low_similarity")
        else:
            seen.add(ex.example_id)
            eligible.append(hit)
    if not eligible:
        return SelectionResult(selected=(), dropped=dict(dropped), candidates=len(hits))

    query_tokens, query_words = estimate_tokens(query_text), _words(query_text)
    features = np.asarray(
        [
            _features_row(
                query, query_tokens, query_words, h, target_tier=target_tier, large_tier=large_tier, now=now
            )
            for h in eligible
        ],
        dtype=np.float64,
    )
    utilities = np.asarray(scorer.score(query_text, eligible, features), dtype=np.float64).reshape(-1)
    if utilities.shape[0] != len(eligible):
        raise ValueError(f"scorer returned {utilities.shape[0]} utilities for {len(eligible)} candidates")
    passing = [i for i in range(len(eligible)) if utilities[i] >= threshold]
    drop("low_utility", len(eligible) - len(passing))
    if max_examples <= 0:
        drop("max_examples", len(passing))
        return SelectionResult(selected=(), dropped=dict(dropped), candidates=len(hits))

    embeddings = _normalised_embeddings([eligible[i] for i in passing])
    gram = embeddings @ embeddings.T
    texts = [_normalised_text(eligible[i].example.request) for i in passing]
    costs = [example_tokens(eligible[i].example) for i in passing]
    relevance = np.asarray([utilities[i] for i in passing])
    redundancy = np.zeros(len(passing))  # max cosine to the kept ones, floored at 0
    remaining = list(range(len(passing)))
    kept: list[int] = []
    budget = token_budget
    while remaining and len(kept) < max_examples:
        mmr = (1.0 - diversity) * relevance[remaining] - diversity * redundancy[remaining]
        j = remaining.pop(int(np.argmax(mmr)))
        if kept and (
            max(gram[j, k] for k in kept) >= duplicate_similarity or texts[j] in {texts[k] for k in kept}
        ):
            drop("near_duplicate")
            continue
        if costs[j] > budget:
            drop("token_budget")
            continue
        kept.append(j)
        budget -= costs[j]
        np.maximum(redundancy, np.maximum(gram[j], 0.0), out=redundancy)
    drop("max_examples", len(remaining))

    chosen = [
        Selected(
            example=eligible[passing[j]].example,
            similarity=float(eligible[passing[j]].similarity),
            utility=float(relevance[j]),
        )
        for j in kept
    ]
    chosen.sort(key=lambda s: (s.utility, s.similarity))  # best last: nearest the question
    return SelectionResult(selected=tuple(chosen), dropped=dict(dropped), candidates=len(hits))
