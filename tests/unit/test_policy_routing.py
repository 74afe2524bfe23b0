"""Routing: bandit context, LinUCB, the load term, choose_backend, the fallback and circuit breakers."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from agents.policy.retrieval import Selected
from agents.policy.routing import (
    CONTEXT_DIM,
    CONTEXT_NAMES,
    ArmEstimate,
    BackendView,
    CircuitBreaker,
    LinUCBBandit,
    RouteDecision,
    choose_backend,
    context_features,
    effective_depth,
    fallback_backend,
    fallback_decision,
    load_penalty,
    route_estimates,
    without_examples,
)
from infra.errors import NoBackendAvailable
from infra.protocols import Example, QueueDepth
from infra.settings import BackendSettings, RoutingSettings

NOW = 1000.0
SMALL = BackendView("small-0", "small", cost=1.0, max_concurrency=16)
LARGE = BackendView("large-0", "large", cost=10.0, max_concurrency=16)
# exploration 0 and no cost tie-break so the tables below read off the means directly
ROUTING = RoutingSettings(
    load_lambda=0.5, load_gamma=0.5, load_q0=2.0, exploration=0.0, feedback_uncertainty=0.1, cost_weight=0.0
)


def depth(name: str, total: float, *, age: float = 0.0, healthy: bool = True) -> QueueDepth:
    return QueueDepth(backend=name, waiting=total, running=0.0, at=NOW - age, healthy=healthy)


def estimates(small: float, large: float, width: float = 0.0) -> dict[str, ArmEstimate]:
    return {"small": ArmEstimate(small, width), "large": ArmEstimate(large, width)}


def route(
    est: dict[str, ArmEstimate],
    depths: dict[str, QueueDepth],
    backends: tuple[BackendView, ...] = (SMALL, LARGE),
    settings: RoutingSettings = ROUTING,
    **kwargs: Any,
) -> RouteDecision:
    return choose_backend(
        estimates=est,
        backends=backends,
        depths=depths,
        now=NOW,
        stale_after_s=2.0,
        settings=settings,
        **kwargs,
    )


def selected_factory(similarity: float, utility: float, quality: float = 0.5) -> Selected:
    ex = Example("e", "acme", "q", "a", np.ones(4, dtype=np.float32), quality=quality)
    return Selected(ex, similarity, utility)


# ---------------------------------------------------------------------------------------- context
def test_context_features_layout() -> None:
    query = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    sel = [selected_factory(0.9, 0.8, 0.6), selected_factory(0.7, 0.6, 0.4)]
    x = context_features(query, sel, prompt_tokens=100)
    f = dict(zip(CONTEXT_NAMES, x, strict=True))
    assert x.shape == (CONTEXT_DIM,) == (16,)
    assert f["bias"] == 1.0 and f["examples"] == pytest.approx(2 / 5)
    assert (f["max_similarity"], f["mean_similarity"]) == pytest.approx((0.9, 0.8))
    assert (f["max_utility"], f["mean_utility"]) == pytest.approx((0.8, 0.7))
    assert f["mean_quality"] == pytest.approx(0.5)
    assert f["prompt_length"] == pytest.approx(6 / 12)  # floor(log2(101)) = 6
    projected = x[8:]
    assert np.all(np.abs(projected) < 3.0) and np.linalg.norm(projected) > 0
    # fixed projection: the same query always maps to the same context, and scale does not matter
    assert np.allclose(context_features(query * 3, sel, prompt_tokens=100), x, atol=1e-6)


def test_context_features_without_examples_or_query() -> None:
    x = context_features(np.zeros(384, dtype=np.float32), [], prompt_text="hello there")
    assert x[0] == 1.0 and np.all(x[1:7] == 0.0) and np.all(x[8:] == 0.0)
    assert x[7] > 0


# ----------------------------------------------------------------------------------------- bandit
def context(examples: int = 0, seed: int = 0) -> np.ndarray:
    query = np.random.default_rng(seed).standard_normal(32).astype(np.float32)
    return context_features(query, [selected_factory(0.9, 0.8)] * examples, prompt_tokens=50)


# small prior = 0.45 + (0.8 - 0.45) * best utility (0.8) + 0.1 per example beyond the first
@pytest.mark.parametrize(("examples", "small_prior"), [(0, 0.45), (1, 0.73), (3, 0.93), (10, 1.0)])
def test_priors_with_example_boost(examples: int, small_prior: float) -> None:
    bandit = LinUCBBandit({"small": 0.45, "large": 0.8}, example_boost=0.1)
    est = bandit.expected(context(examples))
    assert est["small"].mean == pytest.approx(small_prior)
    assert est["large"].mean == pytest.approx(0.8)  # the large tier gets no boost


def test_from_settings_averages_tier_priors() -> None:
    backends = [
        BackendSettings(name="s0", url="http://s0", tier="small", quality_prior=0.4),
        BackendSettings(name="s1", url="http://s1", tier="small", quality_prior=0.5),
        BackendSettings(name="l0", url="http://l0", tier="large", quality_prior=0.8),
    ]
    bandit = LinUCBBandit.from_settings(backends, RoutingSettings(example_boost=0.0), large_tier="large")
    assert bandit.priors == pytest.approx({"small": 0.45, "large": 0.8})


def test_update_moves_the_mean_toward_rewards_and_narrows_the_width() -> None:
    bandit = LinUCBBandit({"small": 0.45, "large": 0.8})
    x = context(2)
    before = bandit.expected(x)["small"]
    for _ in range(200):
        bandit.update("small", x, 0.95)
    after = bandit.expected(x)["small"]
    assert after.mean == pytest.approx(0.95, abs=0.01)
    assert after.width < before.width / 5
    assert bandit.expected(x)["large"] == bandit.expected(x)["large"]  # other arm untouched
    assert bandit.observations("small") == 200 and bandit.observations("large") == 0


def test_means_are_clipped_to_the_unit_interval() -> None:
    bandit = LinUCBBandit({"small": 0.9, "large": 0.9})
    x = context(0)
    for _ in range(50):
        bandit.update("small", x, 1.0)
    bandit.update("small", x, 7.0)  # rewards are clipped too
    assert 0.0 <= bandit.expected(x)["small"].mean <= 1.0


def test_update_rejects_bad_input() -> None:
    bandit = LinUCBBandit({"small": 0.5})
    with pytest.raises(ValueError, match="finite"):
        bandit.update("small", context(), math.nan)
    with pytest.raises(ValueError, match="context"):
        bandit.update("small", np.ones(3), 0.5)
    with pytest.raises(KeyError, match="unknown tier"):
        bandit.update("medium", context(), 0.5)


def test_bandit_checkpoint_round_trips_through_json() -> None:
    bandit = LinUCBBandit({"small": 0.45, "large": 0.8})
    for seed in range(30):
        bandit.update("small" if seed % 2 else "large", context(seed % 3, seed), (seed % 5) / 4)
    restored = LinUCBBandit.from_dict(json.loads(json.dumps(bandit.to_dict())))
    for seed in range(5):
        assert restored.expected(context(1, 100 + seed)) == bandit.expected(context(1, 100 + seed))


def test_checkpoint_follows_the_current_tiers() -> None:
    bandit = LinUCBBandit({"small": 0.45, "large": 0.8})
    bandit.update("small", context(), 1.0)
    restored = LinUCBBandit.from_dict(bandit.to_dict(), priors={"small": 0.5, "xl": 0.9})
    assert restored.tiers == ("small", "xl")
    assert restored.observations("small") == 1 and restored.observations("xl") == 0
    with pytest.raises(ValueError, match="fresh bandit"):
        LinUCBBandit.from_dict({**bandit.to_dict(), "projection_seed": 1})


def test_thompson_second_arm_is_seeded_and_respects_exclude() -> None:
    bandit = LinUCBBandit({"small": 0.45, "medium": 0.6, "large": 0.8})
    x = context(1)
    draws = [bandit.thompson_tier(x, rng=np.random.default_rng(s), exclude={"large"}) for s in range(50)]
    again = [bandit.thompson_tier(x, rng=np.random.default_rng(s), exclude={"large"}) for s in range(50)]
    assert draws == again
    assert set(draws) == {"small", "medium"}  # both explored, large never
    assert bandit.thompson_tier(x, rng=np.random.default_rng(0), exclude=set(bandit.tiers)) is None


# -------------------------------------------------------------------------- examples, per tier
# (small alone, large alone, measured with-examples priors, examples selected, margin) -> shown?
# The best example's utility is 0.8 (``context``), so a tier moves 80% of the way to its target.
@pytest.mark.parametrize(
    ("priors", "with_examples", "examples", "margin", "shown"),
    [
        ((0.45, 0.8), {}, 2, 0.0, {"small": True, "large": False}),  # unmeasured: the old rule
        ((0.45, 0.8), {}, 0, 0.0, {"small": False, "large": False}),  # nothing selected
        ((0.45, 0.8), {"large": 0.9}, 1, 0.0, {"small": True, "large": True}),  # bank reaches large
        ((0.45, 0.8), {"small": 0.4, "large": 0.9}, 1, 0.0, {"small": False, "large": True}),  # hurt
        ((0.45, 0.8), {"large": 0.85}, 1, 0.05, {"small": True, "large": False}),  # gain 0.04 < margin
        ((0.45, 0.8), {"large": 0.75}, 3, 0.0, {"small": True, "large": False}),  # measured to hurt
    ],
)
def test_route_estimates_decide_examples_per_tier(
    priors: tuple[float, float],
    with_examples: dict[str, float],
    examples: int,
    margin: float,
    shown: dict[str, bool],
) -> None:
    bandit = LinUCBBandit(
        {"small": priors[0], "large": priors[1]}, example_boost=0.0, example_priors=with_examples
    )
    x = context(examples)
    est, use = route_estimates(bandit, x, margin=margin)
    assert use == shown
    for tier, used in use.items():  # each tier is scored by the arm it will be served with
        assert est[tier] == bandit.expected(x if used else without_examples(x))[tier]


def test_without_examples_zeroes_only_the_example_summary() -> None:
    x = context(3)
    bare = without_examples(x)
    f = dict(zip(CONTEXT_NAMES, bare, strict=True))
    assert all(f[n] == 0.0 for n in CONTEXT_NAMES[1:7])
    assert np.array_equal(bare[[0, *range(7, CONTEXT_DIM)]], x[[0, *range(7, CONTEXT_DIM)]])
    assert np.array_equal(without_examples(context(0)), context(0)) and x[1] > 0  # input untouched


@pytest.mark.parametrize(
    ("large_depth", "tier", "with_examples"), [(0.0, "large", True), (60.0, "small", False)]
)
def test_the_decision_carries_the_chosen_tiers_examples_choice(
    large_depth: float, tier: str, with_examples: bool
) -> None:
    decision = route(
        estimates(0.5, 0.9),
        {"small-0": depth("small-0", 0), "large-0": depth("large-0", large_depth)},
        examples={"small": False, "large": True},
    )
    assert (decision.tier, decision.with_examples) == (tier, with_examples)
    assert route(estimates(0.5, 0.9), {}).with_examples is False  # no map: never examples


def test_a_measured_gain_below_the_tier_alone_adds_no_boost_and_round_trips() -> None:
    bandit = LinUCBBandit({"small": 0.5, "large": 0.8}, example_boost=0.1, example_priors={"small": 0.3})
    assert bandit.expected(context(3))["small"].mean == pytest.approx(0.5 - 0.2 * 0.8)
    restored = LinUCBBandit.from_dict(json.loads(json.dumps(bandit.to_dict())))
    assert restored.example_priors == {"small": 0.3}
    assert restored.expected(context(3)) == bandit.expected(context(3))


# ------------------------------------------------------------------------------------------- load
@pytest.mark.parametrize(
    ("depth_total", "cost", "expected"),
    [
        (0.0, 10.0, 0.0),
        (2.0, 10.0, 0.0),  # up to q0 nothing
        (4.0, 10.0, 0.5 * math.tanh(1.0)),
        (4.0, 1.0, 0.05 * math.tanh(1.0)),  # cheap backends barely feel their queue
        (1000.0, 10.0, 0.5),  # saturates at lambda
    ],
)
def test_load_penalty_table(depth_total: float, cost: float, expected: float) -> None:
    got = load_penalty(depth_total, q0=2.0, lam=0.5, gamma=0.5, cost=cost, max_cost=10.0)
    assert got == pytest.approx(expected)


# ------------------------------------------------------------------------------------ choose_backend
@pytest.mark.parametrize(
    ("small_mean", "expected_tier"),
    [(0.95, "small"), (0.85, "small"), (0.75, "large"), (0.5, "large"), (0.2, "large")],
)
def test_choice_moves_to_large_as_small_quality_drops(small_mean: float, expected_tier: str) -> None:
    decision = route(
        estimates(small_mean, 0.8), {"small-0": depth("small-0", 0), "large-0": depth("large-0", 0)}
    )
    assert decision.tier == expected_tier
    assert decision.bias == 0.0 and decision.reason.startswith("highest score")


# small 0.6 vs large 0.8: the switch comes where 0.5 * tanh(0.5 * (d - 2)) > 0.2, i.e. d > 2.85
@pytest.mark.parametrize(
    ("large_depth", "expected_tier"),
    [(0, "large"), (2, "large"), (2.8, "large"), (3, "small"), (10, "small"), (100, "small")],
)
def test_choice_moves_to_small_as_the_large_queue_grows(large_depth: float, expected_tier: str) -> None:
    decision = route(
        estimates(0.6, 0.8), {"small-0": depth("small-0", 0), "large-0": depth("large-0", large_depth)}
    )
    assert decision.tier == expected_tier
    assert decision.queue_depths["large-0"] == large_depth
    expected_penalty = load_penalty(large_depth, q0=2.0, lam=0.5, gamma=0.5, cost=10.0, max_cost=10.0)
    assert decision.load_penalty["large-0"] == pytest.approx(expected_penalty)
    assert decision.pressure == pytest.approx(expected_penalty)  # large is the load-blind choice
    if expected_tier == "small":
        assert decision.bias == pytest.approx(0.2)  # quality given up to load: 0.8 - 0.6
        assert "load moved it off large" in decision.reason


def test_replicas_compete_by_normalised_queue_depth() -> None:
    big = BackendView("large-big", "large", cost=10.0, max_concurrency=64)
    tiny = BackendView("large-tiny", "large", cost=10.0, max_concurrency=4)
    depths = {
        "large-big": depth("large-big", 8),
        "large-tiny": depth("large-tiny", 3),
        "small-0": depth("small-0", 0),
    }
    decision = route(estimates(0.1, 0.8), depths, backends=(SMALL, big, tiny))
    assert decision.backend == "large-big"  # 8/64 beats 3/4, although 8 > 3


@pytest.mark.parametrize(
    ("sample", "expected_depth", "state"),
    [
        (None, 2.0 + 8.0, "missing"),
        (depth("large-0", 1, age=5.0), 2.0 + 8.0, "stale"),
        (depth("large-0", 30, age=5.0), 30.0, "stale"),  # the last value when it is worse
        (depth("large-0", 1, healthy=False), 2.0 + 8.0, "unhealthy"),
        (depth("large-0", 1, age=1.0), 1.0, "fresh"),
    ],
)
def test_effective_depth_table(sample: QueueDepth | None, expected_depth: float, state: str) -> None:
    assert effective_depth(LARGE, sample, now=NOW, stale_after_s=2.0, q0=2.0) == (expected_depth, state)


@pytest.mark.parametrize(
    ("large_sample", "expected_tier", "note"),
    [
        (depth("large-0", 0), "large", None),
        (depth("large-0", 0, age=10.0), "small", "stale: large-0"),  # blind: assume 10 queued
        (None, "small", "missing: large-0"),
    ],
)
def test_stale_or_missing_depth_is_pessimistic(
    large_sample: QueueDepth | None, expected_tier: str, note: str | None
) -> None:
    depths = {"small-0": depth("small-0", 0)}
    if large_sample is not None:
        depths["large-0"] = large_sample
    decision = route(estimates(0.6, 0.8), depths)
    assert decision.tier == expected_tier
    if note:
        assert note in decision.reason


def test_a_lone_stale_backend_still_serves() -> None:
    decision = route(estimates(0.6, 0.8), {}, backends=(LARGE,))
    assert decision.backend == "large-0" and "missing: large-0" in decision.reason


def test_unhealthy_backends_are_excluded_unless_nothing_else() -> None:
    depths = {"small-0": depth("small-0", 0, healthy=False), "large-0": depth("large-0", 0)}
    decision = route(estimates(0.99, 0.5), depths)
    assert decision.backend == "large-0" and "small-0" not in decision.scores
    depths["large-0"] = depth("large-0", 0, healthy=False)
    decision = route(estimates(0.99, 0.5), depths)
    assert decision.backend == "small-0"
    assert (
        "only unhealthy backends left" in decision.reason and "unhealthy: small-0, large-0" in decision.reason
    )


@pytest.mark.parametrize(
    ("exclude", "open_circuits", "expected"),
    [
        (set(), set(), "large-0"),
        ({"large-0"}, set(), "small-0"),
        (set(), {"large-0"}, "small-0"),
    ],
)
def test_exclude_and_open_circuits(exclude: set[str], open_circuits: set[str], expected: str) -> None:
    depths = {"small-0": depth("small-0", 0), "large-0": depth("large-0", 0)}
    decision = route(
        estimates(0.5, 0.8), depths, exclude=frozenset(exclude), open_circuits=frozenset(open_circuits)
    )
    assert decision.backend == expected


def test_every_backend_excluded_raises_a_clear_error() -> None:
    with pytest.raises(NoBackendAvailable, match="every backend is excluded"):
        route(estimates(0.5, 0.8), {}, exclude=frozenset({"small-0"}), open_circuits=frozenset({"large-0"}))
    with pytest.raises(NoBackendAvailable, match="no backends"):
        route(estimates(0.5, 0.8), {}, backends=())


def test_a_tier_without_an_estimate_is_skipped() -> None:
    decision = route(
        {"small": ArmEstimate(0.5, 0.0)}, {"small-0": depth("small-0", 0), "large-0": depth("large-0", 0)}
    )
    assert decision.backend == "small-0" and "no estimate for tier: large-0" in decision.reason


@pytest.mark.parametrize(("small_mean", "ask"), [(0.75, True), (0.85, True), (0.6, False), (0.95, False)])
def test_feedback_is_asked_only_when_the_top_two_are_close(small_mean: float, ask: bool) -> None:
    decision = route(
        estimates(small_mean, 0.8), {"small-0": depth("small-0", 0), "large-0": depth("large-0", 0)}
    )
    assert decision.ask_feedback is ask


@pytest.mark.parametrize(("small_mean", "expected_tier"), [(0.80, "small"), (0.76, "small"), (0.74, "large")])
def test_cost_breaks_near_ties_toward_the_cheaper_tier(small_mean: float, expected_tier: str) -> None:
    settings = ROUTING.model_copy(
        update={"cost_weight": 0.05}
    )  # large (cost 10 of 10) pays 0.05, small 0.005
    idle = {"small-0": depth("small-0", 0), "large-0": depth("large-0", 0)}
    assert route(estimates(small_mean, 0.8), idle, settings=settings).tier == expected_tier


def test_exploration_adds_the_width() -> None:
    settings = ROUTING.model_copy(update={"exploration": 1.0})
    est = {"small": ArmEstimate(0.6, 0.5), "large": ArmEstimate(0.8, 0.0)}
    decision = route(est, {"small-0": depth("small-0", 0), "large-0": depth("large-0", 0)}, settings=settings)
    assert decision.tier == "small" and decision.scores["small-0"] == pytest.approx(1.1)


# ---------------------------------------------------------------------------------------- fallback
def test_fallback_picks_the_least_loaded_healthy_backend_of_any_tier() -> None:
    depths = {"small-0": depth("small-0", 12), "large-0": depth("large-0", 4)}
    assert fallback_backend((SMALL, LARGE), depths, now=NOW, stale_after_s=2.0) == LARGE
    depths["large-0"] = depth("large-0", 0, healthy=False)
    assert fallback_backend((SMALL, LARGE), depths, now=NOW, stale_after_s=2.0) == SMALL
    assert fallback_backend((SMALL, LARGE), depths, now=NOW, stale_after_s=2.0, exclude={"small-0"}) == LARGE
    assert (
        fallback_backend((SMALL, LARGE), depths, now=NOW, stale_after_s=2.0, exclude={"small-0", "large-0"})
        is None
    )


def test_fallback_decision_records_the_bypass() -> None:
    depths = {"small-0": depth("small-0", 12), "large-0": depth("large-0", 4, age=9.0)}
    decision = fallback_decision((SMALL, LARGE), depths, now=NOW, stale_after_s=2.0, q0=2.0)
    assert decision.backend == "large-0" and decision.tier == "large"  # stale 4 -> max(4, 2 + 8) = 10 < 12
    assert decision.reason.startswith("bypass (router failed)") and "stale: large-0" in decision.reason
    assert decision.queue_depths == {"large-0": 10.0} and not decision.ask_feedback
    with pytest.raises(NoBackendAvailable, match="router failed"):
        fallback_decision((SMALL,), depths, now=NOW, stale_after_s=2.0, open_circuits={"small-0"})


# ---------------------------------------------------------------------------------------- breakers
@pytest.mark.parametrize(
    ("events", "expected_state", "expected_open"),
    [
        ([("fail", 0), ("fail", 1)], "closed", False),
        ([("fail", 0), ("fail", 1), ("fail", 2)], "open", True),
        ([("fail", 0), ("fail", 1), ("ok", 2), ("fail", 3), ("fail", 4)], "closed", False),  # not consecutive
        ([("fail", 0), ("fail", 1), ("fail", 2), ("check", 6.9)], "open", True),
        ([("fail", 0), ("fail", 1), ("fail", 2), ("check", 7.0)], "half_open", False),  # probe may go
        ([("fail", 0), ("fail", 1), ("fail", 2), ("try", 7.0)], "half_open", True),  # probe in flight
        ([("fail", 0), ("fail", 1), ("fail", 2), ("try", 7.0), ("ok", 7.5)], "closed", False),
        ([("fail", 0), ("fail", 1), ("fail", 2), ("try", 7.0), ("fail", 7.5)], "open", True),
        ([("fail", 0), ("fail", 1), ("fail", 2), ("try", 7.0), ("fail", 7.5), ("check", 12.4)], "open", True),
        (
            [("fail", 0), ("fail", 1), ("fail", 2), ("try", 7.0), ("fail", 7.5), ("check", 12.5)],
            "half_open",
            False,
        ),
        (
            [("fail", 0), ("fail", 1), ("fail", 2), ("try", 7.0), ("check", 12.0)],
            "half_open",
            False,
        ),  # lost probe
        ([("fail", 0), ("fail", 1), ("fail", 2), ("ok", 3.0)], "open", True),  # late success ignored
        (
            [("fail", 0), ("fail", 1), ("fail", 2), ("fail", 4.0), ("check", 7.0)],
            "half_open",
            False,
        ),  # no re-arm
    ],
)
def test_circuit_breaker_transitions(
    events: list[tuple[str, float]], expected_state: str, expected_open: bool
) -> None:
    breaker = CircuitBreaker(failures=3, reset_s=5.0)
    now = 0.0
    for kind, now in events:
        if kind == "fail":
            breaker.record_failure("b", now)
        elif kind == "ok":
            breaker.record_success("b", now)
        elif kind == "try":
            breaker.record_attempt("b", now)
    assert breaker.state("b", now) == expected_state
    assert ("b" in breaker.open_backends(now)) is expected_open


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker = CircuitBreaker(failures=1, reset_s=1.0)
    breaker.record_failure("b", 0.0)
    assert breaker.open_backends(0.5) == {"b"}
    assert breaker.open_backends(1.0) == set()  # the probe may go...
    breaker.record_attempt("b", 1.0)
    assert breaker.open_backends(1.1) == {"b"}  # ...and only one
    breaker.record_attempt("b", 1.1)  # a second dispatch does not re-arm it
    breaker.record_success("b", 1.2)
    assert breaker.open_backends(1.2) == set() and breaker.state("b", 1.2) == "closed"


def test_breakers_are_per_backend() -> None:
    breaker = CircuitBreaker(failures=1, reset_s=1.0)
    breaker.record_failure("a", 0.0)
    breaker.record_success("b", 0.0)
    assert breaker.open_backends(0.1) == {"a"} and breaker.state("b", 0.1) == "closed"


# ------------------------------------------------------------------------- load signal and pending
def _running(name: str, waiting: float, running: float) -> QueueDepth:
    return QueueDepth(backend=name, waiting=waiting, running=running, at=NOW)


@pytest.mark.parametrize(
    ("signal", "large_waiting", "large_running", "expected"),
    [
        ("waiting", 0.0, 12.0, "large"),  # a full batch with nothing waiting: continuous batching absorbs it
        ("total", 0.0, 12.0, "small"),  # the same sample read as waiting + running: pushed off
        ("waiting", 12.0, 4.0, "small"),  # a real queue moves it either way
        ("total", 12.0, 4.0, "small"),
    ],
)
def test_load_signal_picks_what_the_penalty_reads(
    signal: str, large_waiting: float, large_running: float, expected: str
) -> None:
    settings = ROUTING.model_copy(update={"load_signal": signal})
    depths = {
        "small-0": _running("small-0", 0, 0),
        "large-0": _running("large-0", large_waiting, large_running),
    }
    decision = route(estimates(0.6, 0.8), depths, settings=settings)
    assert decision.tier == expected, decision.reason


def test_pending_dispatches_count_until_the_next_sample() -> None:
    """A burst routed between two scrapes: the sample says idle, but this worker already sent 10 there."""
    depths = {"small-0": _running("small-0", 0, 0), "large-0": _running("large-0", 0, 0)}
    assert route(estimates(0.6, 0.8), depths).tier == "large"
    decision = route(estimates(0.6, 0.8), depths, pending={"large-0": 10.0})
    assert decision.tier == "small"
    assert decision.queue_depths["large-0"] == 10.0


def test_pending_balances_replicas_of_one_tier() -> None:
    large_b = BackendView("large-1", "large", cost=10.0, max_concurrency=16)
    depths = {n: _running(n, 0, 0) for n in ("small-0", "large-0", "large-1")}
    decision = route(estimates(0.6, 0.8), depths, backends=(SMALL, LARGE, large_b), pending={"large-0": 1.0})
    assert decision.backend == "large-1"
