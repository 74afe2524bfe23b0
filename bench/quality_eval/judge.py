"""Pairwise judge: the large model picks the better of two answers, asked in both orders. Pure.

The judge sees the question and the two answers (not the reference) and must reply with one letter:
``A``, ``B`` or ``T`` (tie). Each pair is asked twice with the answers swapped; a side wins only when
both orders pick it, anything else (a tie, a flip with the order, an unreadable reply) is a tie. This
removes the judge's position bias from the verdict instead of averaging it in.

``agreement`` compares judge verdicts with a reference metric's verdicts (same tie margin as the win
rates): raw agreement over all pairs, Cohen's kappa over the three labels, and agreement on the pairs
both call decisive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from infra.protocols import ChatMessage

__all__ = ["JUDGE_MAX_TOKENS", "Verdict", "agreement", "combine", "judge_messages", "parse_letter"]

JUDGE_MAX_TOKENS = 2
Verdict = Literal["first", "second", "tie"]
_SYSTEM = "You are a careful, impartial judge of answers to user questions."
_TEMPLATE = (
    "Question:\n{question}\n\n[Answer A]\n{a}\n[End of answer A]\n\n[Answer B]\n{b}\n[End of answer B]\n\n"
    "Which answer is more helpful, correct and relevant to the question? Reply with exactly one "
    "letter: A if answer A is better, B if answer B is better, T if they are equally good."
)


def judge_messages(question: str, a: str, b: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content=_SYSTEM),
        ChatMessage(
            role="user", content=_TEMPLATE.format(question=question.strip(), a=a.strip(), b=b.strip())
        ),
    ]


def parse_letter(reply: str) -> Literal["A", "B", "T", "?"]:
    """The first letter of the reply if it is A, B or T (any case); ``?`` otherwise."""
    for ch in reply.strip():
        up = ch.upper()
        if up in ("A", "B", "T"):
            return up  # type: ignore[return-value]
        if ch.isalnum():
            return "?"
    return "?"


def combine(first_shown_first: str, first_shown_second: str) -> Verdict:
    """Verdict for (first, second) from the reply with first as A and the reply with first as B."""
    ab, ba = parse_letter(first_shown_first), parse_letter(first_shown_second)
    if ab == "A" and ba == "B":
        return "first"
    if ab == "B" and ba == "A":
        return "second"
    return "tie"


def agreement(judge: Sequence[Verdict], metric: Sequence[Verdict]) -> dict[str, float]:
    """Raw agreement, Cohen's kappa, and agreement where both verdicts are decisive (with its n)."""
    if len(judge) != len(metric):
        raise ValueError(f"{len(judge)} judge verdicts for {len(metric)} metric verdicts")
    n = len(judge)
    if n == 0:
        return {
            "n": 0,
            "agreement": float("nan"),
            "kappa": float("nan"),
            "decisive_n": 0,
            "decisive_agreement": float("nan"),
        }
    labels = ("first", "second", "tie")
    observed = sum(1 for j, m in zip(judge, metric, strict=True) if j == m) / n
    expected = 0.0
    for lab in labels:
        expected += sum(1 for j in judge if j == lab) / n * (sum(1 for m in metric if m == lab) / n)
    kappa = (observed - expected) / (1.0 - expected) if expected < 1.0 else float("nan")
    decisive = [(j, m) for j, m in zip(judge, metric, strict=True) if j != "tie" and m != "tie"]
    return {
        "n": n,
        "agreement": observed,
        "kappa": kappa,
        "decisive_n": len(decisive),
        "decisive_agreement": sum(1 for j, m in decisive if j == m) / len(decisive)
        if decisive
        else float("nan"),
    }
