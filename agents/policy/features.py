"""Stage-2 inputs: token estimates and the features the utility model scores candidates on.

Pure: no I/O, no clock (``now`` is an argument, unix seconds like ``Example.created_at``).
"""

from __future__ import annotations

import math
import re

import numpy as np
import numpy.typing as npt

from infra.protocols import Example, SearchHit, Vector

__all__ = [
    "CHARS_PER_TOKEN",
    "FEATURE_NAMES",
    "TURN_OVERHEAD_TOKENS",
    "candidate_features",
    "estimate_tokens",
    "example_token_budget",
    "example_tokens",
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
