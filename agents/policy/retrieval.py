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

Features and token estimates live in ``features.py``; ``UtilityModel``, the ``UtilityScorer`` seam and
``ThresholdTuner`` (which moves the utility threshold from sampled outcomes) in ``utility.py``; all are
re-exported here. Everything here is pure: no I/O and no clock (``now`` is an
argument, unix seconds like ``Example.created_at``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from agents.policy.features import (
    FEATURE_NAMES,
    _features_row,
    _words,
    candidate_features,
    estimate_tokens,
    example_token_budget,
    example_tokens,
)
from agents.policy.utility import ThresholdTuner, UtilityModel, UtilityScorer
from infra.protocols import Example, SearchHit, Vector

# Re-exported: the stage-2 pieces live in features.py and utility.py to keep modules small.
__all__ = [
    "FEATURE_NAMES",
    "Selected",
    "SelectionResult",
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
    eligible = _eligible(hits, tenant=tenant, min_similarity=min_similarity, dropped=dropped)
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
    _drop(dropped, "low_utility", len(eligible) - len(passing))
    if max_examples <= 0:
        _drop(dropped, "max_examples", len(passing))
        return SelectionResult(selected=(), dropped=dict(dropped), candidates=len(hits))

    candidates = [eligible[i] for i in passing]
    relevance = np.asarray([utilities[i] for i in passing])
    kept = _mmr(
        candidates,
        relevance,
        max_examples=max_examples,
        duplicate_similarity=duplicate_similarity,
        diversity=diversity,
        token_budget=token_budget,
        dropped=dropped,
    )
    chosen = [
        Selected(
            example=candidates[j].example,
            similarity=float(candidates[j].similarity),
            utility=float(relevance[j]),
        )
        for j in kept
    ]
    chosen.sort(key=lambda s: (s.utility, s.similarity))  # best last: nearest the question
    return SelectionResult(selected=tuple(chosen), dropped=dict(dropped), candidates=len(hits))


def _drop(dropped: Counter[str], reason: DropReason, count: int = 1) -> None:
    if count:
        dropped[reason] += count


def _eligible(
    hits: Sequence[SearchHit], *, tenant: str | None, min_similarity: float, dropped: Counter[str]
) -> list[SearchHit]:
    """Hits of the tenant, first of each id, usable, and similar enough; the rest counted as dropped."""
    eligible: list[SearchHit] = []
    seen: set[str] = set()
    for hit in hits:
        ex = hit.example
        if tenant is not None and ex.tenant != tenant:
            _drop(dropped, "other_tenant")
        elif ex.example_id in seen:
            _drop(dropped, "repeated_id")
        elif not ex.usable:
            _drop(dropped, "unusable")
        elif not hit.similarity >= min_similarity:  # NaN fails too
            _drop(dropped, "low_similarity")
        else:
            seen.add(ex.example_id)
            eligible.append(hit)
    return eligible


def _mmr(
    candidates: Sequence[SearchHit],
    relevance: FloatArray,
    *,
    max_examples: int,
    duplicate_similarity: float,
    diversity: float,
    token_budget: int,
    dropped: Counter[str],
) -> list[int]:
    """Indices into ``candidates`` that MMR keeps, in the order kept (see ``select_examples``)."""
    embeddings = _normalised_embeddings(candidates)
    gram = embeddings @ embeddings.T
    redundancy = np.zeros(len(candidates))  # max cosine to the kept ones, floored at 0
    remaining = list(range(len(candidates)))
    kept: list[int] = []
    kept_texts: set[str] = set()
    budget = token_budget
    while remaining and len(kept) < max_examples:
        mmr = (1.0 - diversity) * relevance[remaining] - diversity * redundancy[remaining]
        j = remaining.pop(int(np.argmax(mmr)))
        example = candidates[j].example
        text = _normalised_text(example.request)
        if kept and (max(gram[j, k] for k in kept) >= duplicate_similarity or text in kept_texts):
            _drop(dropped, "near_duplicate")
            continue
        cost = example_tokens(example)
        if cost > budget:
            _drop(dropped, "token_budget")
            continue
        kept.append(j)
        kept_texts.add(text)
        budget -= cost
        np.maximum(redundancy, np.maximum(gram[j], 0.0), out=redundancy)
    _drop(dropped, "max_examples", len(remaining))
    return kept
