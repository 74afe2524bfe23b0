"""``agents.models.apply_update``: one joined feedback, applied the same way by every worker (the
router's bandit, the utility model's training rows, the threshold tuner), and the checkpoint that
carries it across restarts. ``agents.learn.decision_from_log`` builds what the join needs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from agents.learn import decision_from_log
from agents.models import apply_update
from agents.policy.retrieval import FEATURE_NAMES
from agents.policy.routing import CONTEXT_DIM
from agents.state import DecisionState, RecentDecision
from infra.settings import Settings, load_settings
from streams.codecs import encode_vector
from streams.records import ExampleRef, LogRecord, ModelUpdateRecord, ReplyRecord, RequestRecord, RouteInfo
from tests.fakes.embedder import FakeEmbedder

DIM = 384
_REQUEST_IDS = itertools.count()
ROW = [0.5] * len(FEATURE_NAMES)  # one example's utility features


def settings(tmp_path: Path | None = None) -> Settings:
    paths: dict[str, dict[str, str]] = {}
    if tmp_path is not None:
        paths = {
            "routing": {"state_path": str(tmp_path / "bandit.json")},
            "selection": {"utility_model_path": str(tmp_path / "utility.json")},
        }
    return load_settings(kafka={"topic_prefix": "unit"}, **paths)


def context(examples: int = 0) -> list[float]:
    x = [0.0] * CONTEXT_DIM
    x[0], x[1] = 1.0, examples / 5.0
    x[8] = 0.5
    return x


def update(
    tier: str = "small", reward: float = 1.0, *, ctx: list[float] | None = None, examples: int = 0
) -> ModelUpdateRecord:
    features = [list(ROW) for _ in range(examples)]
    return ModelUpdateRecord(
        request_id=f"r{next(_REQUEST_IDS)}",  # each update is a distinct rating (applied once per id)
        tier=tier,
        context=context() if ctx is None else ctx,
        reward=reward,
        example_features=features,
        utilities=[0.7] * examples,
    )


def mean(state: DecisionState, tier: str, ctx: list[float]) -> float:
    return state.bandit.expected(np.asarray(ctx))[tier].mean


# --------------------------------------------------------------------------------------------- bandit
def test_a_reward_updates_that_tiers_arm_only() -> None:
    state = DecisionState.create(settings())
    before_small, before_large = mean(state, "small", context()), mean(state, "large", context())
    for _ in range(5):
        apply_update(state, update("small", 1.0))
    assert state.bandit.observations("small") == 5 and state.bandit.observations("large") == 0
    assert mean(state, "small", context()) > before_small
    assert mean(state, "large", context()) == pytest.approx(before_large)
    assert state.updates_since_save == 5


def test_a_low_reward_lowers_the_tiers_estimate() -> None:
    state = DecisionState.create(settings())
    before = mean(state, "large", context())
    apply_update(state, update("large", 0.0))
    assert mean(state, "large", context()) < before


@pytest.mark.parametrize("record", [update("medium"), update(ctx=[])], ids=["unknown tier", "no context"])
def test_an_update_the_bandit_cannot_use_leaves_it_alone(record: ModelUpdateRecord) -> None:
    state = DecisionState.create(settings())
    apply_update(state, record)
    assert state.bandit.observations("small") == 0 and state.bandit.observations("large") == 0
    assert state.updates_since_save == 1


def test_workers_that_apply_the_same_updates_route_identically() -> None:
    a, b = DecisionState.create(settings()), DecisionState.create(settings())
    stream = [update("small", 0.9, examples=2), update("large", 0.2), update("small", 0.4, ctx=context(3))]
    for record in stream:
        apply_update(a, record)
        apply_update(b, record)
    assert a.bandit.to_dict() == b.bandit.to_dict()


# ------------------------------------------------------------------------ utility model and tuner
def test_each_example_used_becomes_a_training_row_and_a_tuner_observation() -> None:
    state = DecisionState.create(settings())
    apply_update(state, update("small", 0.8, examples=3))
    assert len(state.training_x) == 3 and state.training_y == [0.8, 0.8, 0.8]
    assert [list(x) for x in state.training_x] == [ROW] * 3
    assert len(state.tuner) == 3


def test_the_utility_model_retrains_once_there_are_both_outcomes() -> None:
    state = DecisionState.create(settings())
    rng = np.random.default_rng(7)
    for i in range(40):
        row = rng.uniform(0, 1, len(FEATURE_NAMES)).tolist()
        good = i % 2 == 0
        apply_update(
            state,
            ModelUpdateRecord(
                request_id=f"r{i}",
                tier="small",
                context=context(1),
                reward=1.0 if good else 0.0,
                example_features=[row],
                utilities=[0.8 if good else 0.3],
            ),
        )
    before = state.utility.weights.copy()
    assert state.retrain_utility()
    assert not np.allclose(state.utility.weights, before)


def test_too_few_rows_do_not_retrain() -> None:
    state = DecisionState.create(settings())
    apply_update(state, update("small", 1.0, examples=2))
    assert not state.retrain_utility()


# -------------------------------------------------------------------------------------- checkpoint
def test_a_checkpoint_restores_the_learned_state_and_the_offset(tmp_path: Path) -> None:
    state = DecisionState.create(settings(tmp_path))
    for reward in (1.0, 0.9, 1.0):
        apply_update(state, update("small", reward, examples=1))
    state.applied_offset = 41
    state.save()
    assert state.updates_since_save == 0

    restored = DecisionState.create(settings(tmp_path))
    assert restored.applied_offset == 41
    assert restored.bandit.to_dict() == state.bandit.to_dict()
    assert restored.tuner.threshold == state.tuner.threshold


# ------------------------------------------------------------------------------- the join's input
async def test_decision_from_log_keeps_what_feedback_needs() -> None:
    vector = (await FakeEmbedder(DIM).embed(["q"]))[0]
    request = RequestRecord(request_id="r1", tenant="acme", prompt="q", max_new_tokens=8, reply_topic="t")
    refs = [ExampleRef(example_id="e1", request="q1", response="a1", similarity=0.9, utility=0.7)]
    record = LogRecord(
        request=request,
        embedding=encode_vector(vector),
        examples=refs,
        route=RouteInfo(backend="small-0", tier="small", context=context(1)),
        reply=ReplyRecord(request_id="r1", tenant="acme", ok=True, text="a", tier="small"),
        logged_at=1_700_000_000.0,
    )
    decision = decision_from_log(record, DIM, "large")
    assert decision is not None
    assert (decision.tier, decision.example_ids, decision.utilities) == ("small", ("e1",), (0.7,))
    assert decision.context.tolist() == context(1) and len(decision.example_features) == 1

    failed = LogRecord(
        request=request,
        embedding="",
        examples=[],
        route=None,
        reply=ReplyRecord(request_id="r1", tenant="acme", ok=False),
    )
    assert decision_from_log(failed, DIM, "large") is None


def test_the_feedback_window_bounds_the_remembered_decisions() -> None:
    state = DecisionState.create(load_settings(routing={"feedback_window": 3}))
    assert state.recent_capacity == 3
    for i in range(5):
        state.remember(f"r{i}", _decision())
    assert list(state.recent) == ["r2", "r3", "r4"]  # the oldest fall out first


def _decision() -> RecentDecision:
    return RecentDecision(tier="small", context=np.zeros(CONTEXT_DIM), example_ids=(), example_features=())
