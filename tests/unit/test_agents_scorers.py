"""``agents.scorers``: the replay scorers, on ``FakeEmbedder`` and a scripted ``FakeGenerator`` judge."""

from __future__ import annotations

import pytest

from agents.scorers import PairwiseJudgeScorer, ReferenceFreeScorer
from tests.fakes.backends import FakeGenerator
from tests.fakes.embedder import FakeEmbedder

QUESTION = "how do I reset my password"


async def test_reference_free_prefers_a_relevant_full_answer() -> None:
    scorer = ReferenceFreeScorer(FakeEmbedder(64))
    relevant = "to reset your password open settings then security and choose reset password"
    scores = await scorer.score(QUESTION, [relevant, "bananas are yellow", "reset reset reset reset"])
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] == max(scores)
    assert await scorer.score(QUESTION, []) == []


async def test_the_judge_scores_both_orders_and_maps_to_the_incumbent_scale() -> None:
    judge = FakeGenerator("judge", script=["Score: 3", "Score: -3"])  # A better, then (B first) A better
    scores = await PairwiseJudgeScorer(judge).score(QUESTION, ["new answer"], incumbent="old answer")
    assert scores == [pytest.approx(1.0)]
    first, second = (call.messages[-1].content for call in judge.calls)
    assert first.index("new answer") < first.index("old answer")
    assert second.index("old answer") < second.index("new answer")


async def test_an_unparseable_judge_reply_is_inconclusive_not_a_crash() -> None:
    judge = FakeGenerator("judge", script=["I think both are fine.", "Score: 1"])
    scores = await PairwiseJudgeScorer(judge).score(QUESTION, ["new answer"], incumbent="old answer")
    assert scores == [0.5]  # no evidence either way: as good as the incumbent


async def test_without_an_incumbent_every_answer_is_at_parity() -> None:
    judge = FakeGenerator("judge")
    assert await PairwiseJudgeScorer(judge).score(QUESTION, ["a", "b"]) == [0.5, 0.5]
    assert judge.calls == []
