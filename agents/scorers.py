"""Answer-quality scorers used by replay (and by the benchmarks): pluggable behind ``Scorer``.

* ``ReferenceFreeScorer`` (default, runs anywhere): relevance = cosine(question, answer) of the
  embedding model, times a degeneracy guard (distinct-token ratio, length sanity). It is cheap and
  honest about what it is: a relevance proxy, not a judge of correctness.
* ``PairwiseJudgeScorer``: the paper's rubric. A TGI backend compares two answers from -3 to +3,
  in both orders (to cancel position bias); the mean maps to [0, 1] against the incumbent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agents.policy.scoring import combine_both_orders, judge_messages, parse_judge_score
from infra.protocols import Embedder, GenerationParams, Generator

__all__ = ["PairwiseJudgeScorer", "ReferenceFreeScorer", "Scorer"]

_WORD = re.compile(r"\w+")


class Scorer(Protocol):
    async def score(self, question: str, answers: Sequence[str], incumbent: str | None = None) -> list[float]:
        """Quality in [0, 1] for each answer (relative to ``incumbent`` where the scorer is pairwise)."""
        ...


def _degeneracy_guard(answer: str) -> float:
    words = _WORD.findall(answer.lower())
    if not words:
        return 0.0
    distinct = len(set(words)) / len(words)
    length = min(1.0, len(words) / 8.0)  # very short answers are rarely complete
    return float(min(1.0, 0.3 + distinct)) * length


class ReferenceFreeScorer:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def score(self, question: str, answers: Sequence[str], incumbent: str | None = None) -> list[float]:
        if not answers:
            return []
        vectors = await self.embedder.embed([question, *answers])
        sims = vectors[1:] @ vectors[0]
        return [
            float(np.clip(s, 0.0, 1.0)) * _degeneracy_guard(a) for s, a in zip(sims, answers, strict=True)
        ]


class PairwiseJudgeScorer:
    """Scores each answer against the incumbent with an LLM judge; 0.5 = as good as the incumbent."""

    def __init__(self, judge: Generator, *, max_new_tokens: int = 8) -> None:
        self.judge = judge
        self.params = GenerationParams(max_new_tokens=max_new_tokens, temperature=None)

    async def _compare(self, question: str, a: str, b: str) -> float | None:
        out = await self.judge.generate(judge_messages(question, a, b), self.params)
        return parse_judge_score(out.text)

    async def score(self, question: str, answers: Sequence[str], incumbent: str | None = None) -> list[float]:
        if incumbent is None:
            return [0.5 for _ in answers]
        scores = []
        for answer in answers:
            ab = await self._compare(question, answer, incumbent)
            ba = await self._compare(question, incumbent, answer)
            if ab is None or ba is None:  # a reply without a score: no evidence, keep parity
                scores.append(0.5)
                continue
            combined = combine_both_orders(ab, ba)  # in [-3, 3], positive = answer better
            scores.append(float(np.clip(0.5 + combined / 6.0, 0.0, 1.0)))
        return scores
