"""The order of the work: every prefix of it is a usable paired sample. Pure.

Live ShareGPT requests come in manifest order (round-robin over the similarity bins). For each one the
primary pair runs first (``large``, then ``small_two_stage``); every ``secondary_every``-th request
also gets the other generated conditions; every ``fact_every``-th request is followed by one fact
question in its four conditions; judge jobs (both orders of one primary pair) follow every
``judge_every``-th request when ``judge_every`` is set. Stopping anywhere leaves complete pairs
(conditions of one request run back to back), so the primary contrast always has the most pairs and
the others about ``1 / secondary_every`` as many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["FACT_CONDITIONS", "PRIMARY", "SECONDARY", "Job", "build_schedule", "fact_question_order"]

PRIMARY = ("large", "small_two_stage")
SECONDARY = ("small", "small_topk", "small_random", "large_two_stage")
FACT_CONDITIONS = ("small", "small_two_stage", "large", "large_two_stage")
Kind = Literal["sharegpt", "fact", "judge"]


@dataclass(frozen=True, slots=True)
class Job:
    kind: Kind
    item: int  # live index (sharegpt, judge) or fact-question index (fact)
    condition: str  # for judge jobs: "ab" or "ba" (which answer is shown first)


def fact_question_order(questions_per_fact: Sequence[int]) -> list[tuple[int, int]]:
    """(fact, question) pairs: every fact's first question, then every fact's second, and so on."""
    out: list[tuple[int, int]] = []
    for q in range(max(questions_per_fact, default=0)):
        out.extend((f, q) for f, n in enumerate(questions_per_fact) if q < n)
    return out


def build_schedule(
    n_live: int,
    n_fact_questions: int,
    *,
    secondary_every: int = 2,
    fact_every: int = 2,
    judge_every: int | None = None,
) -> list[Job]:
    if secondary_every < 1 or fact_every < 1 or (judge_every is not None and judge_every < 1):
        raise ValueError("the every-n settings must be >= 1")
    jobs: list[Job] = []
    fact = 0
    for i in range(n_live):
        jobs.extend(Job("sharegpt", i, c) for c in PRIMARY)
        if i % secondary_every == 0:
            jobs.extend(Job("sharegpt", i, c) for c in SECONDARY)
        if judge_every is not None and i % judge_every == 0:
            jobs.extend((Job("judge", i, "ab"), Job("judge", i, "ba")))
        if i % fact_every == 0 and fact < n_fact_questions:
            jobs.extend(Job("fact", fact, c) for c in FACT_CONDITIONS)
            fact += 1
    while fact < n_fact_questions:  # facts left over once the live list is exhausted
        jobs.extend(Job("fact", fact, c) for c in FACT_CONDITIONS)
        fact += 1
    return jobs
