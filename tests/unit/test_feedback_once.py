"""Idempotent feedback: one rating per (request id, rater) changes the models once, also when the
record is redelivered and when the worker restarts from its checkpoint (agents/state.py)."""

from __future__ import annotations

from pathlib import Path

from agents.models import apply_update
from agents.policy.routing import CONTEXT_DIM
from agents.state import DecisionState
from infra.settings import Settings, load_settings
from streams.records import ModelUpdateRecord


def _settings(tmp_path: Path, window: int = 50_000) -> Settings:
    return load_settings(
        kafka={"topic_prefix": "unit"},
        routing={"state_path": str(tmp_path / "bandit.json"), "feedback_window": window},
    )


def _rating(request_id: str, rater: str = "", reward: float = 1.0) -> ModelUpdateRecord:
    context = [0.0] * CONTEXT_DIM
    context[0] = 1.0
    return ModelUpdateRecord(
        request_id=request_id,
        tier="small",
        context=context,
        reward=reward,
        example_features=[[0.5, 0.5]],
        utilities=[0.7],
        rater=rater,
    )


def test_a_redelivered_rating_updates_the_models_once(tmp_path: Path) -> None:
    state = DecisionState.create(_settings(tmp_path))
    record = _rating("r1", "alice")
    for _ in range(3):  # the same feedback record delivered three times
        apply_update(state, record)
    assert state.bandit.observations("small") == 1
    assert len(state.training_y) == 1
    assert len(state.tuner) == 1
    assert state.duplicate_ratings == 2


def test_each_rater_of_a_request_counts_once(tmp_path: Path) -> None:
    state = DecisionState.create(_settings(tmp_path))
    for rater in ("alice", "bob", "alice", "", "bob", ""):
        apply_update(state, _rating("r1", rater))
    assert state.bandit.observations("small") == 3
    assert state.duplicate_ratings == 3


def test_a_restarted_worker_still_applies_a_redelivered_rating_once(tmp_path: Path) -> None:
    state = DecisionState.create(_settings(tmp_path))
    apply_update(state, _rating("r1", "alice"))
    state.applied_offset = 0
    state.save()
    bandit = state.bandit.to_dict()

    restarted = DecisionState.create(_settings(tmp_path))  # loads bandit, offset and rating keys together
    assert restarted.bandit.to_dict() == bandit
    apply_update(restarted, _rating("r1", "alice"))  # learn re-published it before the restart
    assert restarted.bandit.observations("small") == 1
    assert restarted.bandit.to_dict() == bandit
    apply_update(restarted, _rating("r2", "alice"))
    assert restarted.bandit.observations("small") == 2


def test_the_remembered_ratings_are_bounded_by_the_feedback_window(tmp_path: Path) -> None:
    state = DecisionState.create(_settings(tmp_path, window=100))
    for i in range(10_000):
        apply_update(state, _rating(f"r{i}"))
    assert len(state.applied_ratings) == 100
    assert state.bandit.observations("small") == 10_000
