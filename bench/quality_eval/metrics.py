"""Reference metrics: MiniLM cosine, ROUGE-L F1 (``rouge-score``) and chrF (``sacrebleu``).

Every answer is scored against its request's reference, the recorded ChatGPT reply cut to its first
``REFERENCE_WORDS`` words: the generated answers stop at 96 new tokens (about 70 words), and an
uncut 400-word reference would reward length, not content. The semantic cache's answer (a stored
reply of any length) is cut to ``CACHE_ANSWER_WORDS`` words for the same reason. An empty answer
scores 0 on every metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CACHE_ANSWER_WORDS", "METRICS", "REFERENCE_WORDS", "Scores", "cut_words", "score_pairs"]

REFERENCE_WORDS = 100
CACHE_ANSWER_WORDS = 72
METRICS = ("cosine", "rouge_l", "chrf")


def cut_words(text: str, limit: int) -> str:
    """The first ``limit`` whitespace-separated words of ``text`` (all of it if shorter)."""
    words = text.split()
    return text.strip() if len(words) <= limit else " ".join(words[:limit])


@dataclass(frozen=True, slots=True)
class Scores:
    cosine: float  # MiniLM cosine in [-1, 1]
    rouge_l: float  # ROUGE-L F1 in [0, 1], Porter stemming
    chrf: float  # chrF (sacrebleu defaults: char 6-grams, beta 2) on a 0-100 scale

    def get(self, metric: str) -> float:
        return float(getattr(self, metric))


def score_pairs(answers: Sequence[str], references: Sequence[str], *, embed_threads: int = 2) -> list[Scores]:
    """Scores of each answer against its reference (references already cut by the caller)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        return []
    from rouge_score import rouge_scorer
    from sacrebleu.metrics.chrf import CHRF

    from bench.quality_eval.prepare import embed_texts

    texts = sorted({*answers, *references})
    index = {t: i for i, t in enumerate(texts)}
    vectors = embed_texts(texts, threads=embed_threads).astype(np.float64)
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    chrf = CHRF()
    out = []
    for answer, reference in zip(answers, references, strict=True):
        if not answer.strip():
            out.append(Scores(0.0, 0.0, 0.0))
            continue
        out.append(
            Scores(
                cosine=float(vectors[index[answer]] @ vectors[index[reference]]),
                rouge_l=float(rouge.score(reference, answer)["rougeL"].fmeasure),
                chrf=float(chrf.sentence_score(answer, [reference]).score),
            )
        )
    return out
