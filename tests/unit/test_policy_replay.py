"""The example manager: replay priority and timing, best-of-n, offload credit and eviction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from agents.policy.replay import (
    credit_offload,
    decayed_value,
    is_off_peak,
    pick_best,
    plan_eviction,
    plan_replay,
    replay_gain,
    update_gain,
)
from infra.protocols import Example, QueueDepth

HOUR = 3600.0
NOW = 1_700_000_000.0


def example_factory(
    example_id: str,
    *,
    size: int = 100,
    offloads: float = 0.0,
    gain: float = 0.0,
    rounds: int = 0,
    usable: bool = True,
    age: float = HOUR,
    updated_age: float = 0.0,
) -> Example:
    return Example(
        example_id=example_id,
        tenant="acme",
        request="q" * (size // 2),
        response="a" * (size - size // 2),
        embedding=np.zeros(4, dtype=np.float32),
        gain=gain,
        offloads=offloads,
        replay_rounds=rounds,
        usable=usable,
        created_at=NOW - age,
        updated_at=NOW - updated_age,
    )


# -------------------------------------------------------------------------------------------- gain
@pytest.mark.parametrize(
    ("quality", "cost", "max_cost", "expected"),
    [
        (0.0, 10.0, 10.0, 1.0),  # worst answer, priciest model: top priority
        (1.0, 10.0, 10.0, 0.0),  # perfect answer: nothing to gain
        (0.5, 5.0, 10.0, 0.25),
        (0.5, 1.0, 10.0, 0.05),
        (-1.0, 20.0, 10.0, 1.0),  # clipped
        (0.5, 1.0, 0.0, 0.0),  # no cost scale: no gain
    ],
)
def test_replay_gain_table(quality: float, cost: float, max_cost: float, expected: float) -> None:
    assert replay_gain(quality=quality, cost=cost, max_cost=max_cost) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prev", "quality", "ema", "expected"),
    [
        (0.0, 0.0, 0.3, 0.3),
        (1.0, 1.0, 0.3, 0.7),
        (0.5, 0.5, 1.0, 0.5),
        (0.2, 0.5, 0.5, 0.35),
    ],
)
def test_update_gain_is_an_ema(prev: float, quality: float, ema: float, expected: float) -> None:
    got = update_gain(prev, quality=quality, cost=10.0, max_cost=10.0, ema=ema)
    assert got == pytest.approx(expected)


def test_update_gain_converges_to_the_instant_gain() -> None:
    g = 0.0
    for _ in range(100):
        g = update_gain(g, quality=0.4, cost=5.0, max_cost=10.0, ema=0.3)
    assert g == pytest.approx(0.3)
    with pytest.raises(ValueError, match="ema"):
        update_gain(0.0, quality=0.5, cost=1.0, max_cost=1.0, ema=0.0)


# -------------------------------------------------------------------------------------- off-peak
def sample(name: str, total: float, *, age: float = 0.0, healthy: bool = True) -> QueueDepth:
    return QueueDepth(backend=name, waiting=total, running=0.0, at=100.0 - age, healthy=healthy)


@pytest.mark.parametrize(
    ("depths", "large", "expected"),
    [
        ({"l0": sample("l0", 0), "l1": sample("l1", 1)}, ["l0", "l1"], True),
        ({"l0": sample("l0", 0), "l1": sample("l1", 3)}, ["l0", "l1"], False),  # one busy replica
        ({"l0": sample("l0", 0, age=5.0)}, ["l0"], False),  # stale: cannot see it
        ({"l0": sample("l0", 0, healthy=False)}, ["l0"], False),
        ({"l0": sample("l0", 0)}, ["l0", "l1"], False),  # l1 never scraped
        ({"s0": sample("s0", 50), "l0": sample("l0", 0)}, ["l0"], True),  # small tiers do not matter
        ({}, [], False),
    ],
)
def test_is_off_peak_table(depths: dict[str, QueueDepth], large: list[str], expected: bool) -> None:
    assert is_off_peak(depths, large, threshold=1.0, now=100.0, stale_after_s=2.0) is expected


# ------------------------------------------------------------------------------------------ replay
def test_plan_replay_orders_by_gain_and_stops_at_the_cut_off() -> None:
    examples = [
        example_factory("low", gain=0.04),
        example_factory("mid", gain=0.3),
        example_factory("top", gain=0.9),
        example_factory("edge", gain=0.05),
    ]
    assert [e.example_id for e in plan_replay(examples, k=10, min_gain=0.05, max_rounds=5)] == [
        "top",
        "mid",
        "edge",
    ]
    assert [e.example_id for e in plan_replay(examples, k=1, min_gain=0.05, max_rounds=5)] == ["top"]
    assert plan_replay(examples, k=0, min_gain=0.05, max_rounds=5) == []


@pytest.mark.parametrize(("rounds", "included"), [(0, True), (4, True), (5, False), (9, False)])
def test_plan_replay_honours_the_round_cap(rounds: int, included: bool) -> None:
    planned = plan_replay([example_factory("e", gain=0.9, rounds=rounds)], k=5, min_gain=0.05, max_rounds=5)
    assert bool(planned) is included


def test_plan_replay_skips_unusable_and_breaks_ties_deterministically() -> None:
    examples = [
        example_factory("b", gain=0.5, rounds=1),
        example_factory("a", gain=0.5, rounds=1),
        example_factory("c", gain=0.5, rounds=0),
        example_factory("x", gain=0.9, usable=False),
    ]
    assert [e.example_id for e in plan_replay(examples, k=5, min_gain=0.0, max_rounds=5)] == ["c", "a", "b"]


@pytest.mark.parametrize(
    ("candidates", "incumbent", "margin", "expected"),
    [
        ([("a", 0.9), ("b", 0.7)], 0.5, 0.1, "a"),
        ([("a", 0.55)], 0.5, 0.1, None),  # not clearly better
        ([("a", 0.6)], 0.5, 0.1, None),  # exactly the margin is not enough
        ([("a", 0.61)], 0.5, 0.1, "a"),
        ([("a", 0.9), ("b", 0.9)], 0.5, 0.1, "a"),  # ties: first
        ([("", 1.0), ("b", 0.8)], 0.5, 0.1, "b"),  # empty answers never win
        ([("a", float("nan"))], 0.5, 0.1, None),
        ([], 0.5, 0.1, None),
    ],
)
def test_pick_best_table(
    candidates: list[tuple[str, float]], incumbent: float, margin: float, expected: str | None
) -> None:
    assert pick_best(candidates, incumbent, margin) == expected


# ---------------------------------------------------------------------------------------- value
@pytest.mark.parametrize(
    ("hours", "expected"),
    [(0.0, 10.0), (1.0, 9.0), (2.0, 8.1), (-1.0, 10.0)],  # a clock step back never grows the value
)
def test_decayed_value_table(hours: float, expected: float) -> None:
    assert decayed_value(10.0, NOW, NOW + hours * HOUR, 0.9) == pytest.approx(expected)


@pytest.mark.parametrize(("success", "expected"), [(True, 9.0 + 1.0), (False, 9.0)])
def test_credit_offload(success: bool, expected: float) -> None:
    ex = example_factory("e", offloads=10.0, updated_age=HOUR)
    credited = credit_offload(ex, success, NOW, 0.9)
    assert credited.offloads == pytest.approx(expected)
    assert credited.updated_at == NOW
    assert credited.example_id == ex.example_id and credited.response == ex.response


# ---------------------------------------------------------------------------------------- eviction
def test_eviction_does_nothing_under_budget() -> None:
    examples = [example_factory(f"e{i}", size=100) for i in range(5)]
    assert plan_eviction(examples, budget_bytes=500, now=NOW, ttl_s=24 * HOUR, decay_per_hour=0.9) == []


def test_eviction_honours_ttl_even_under_budget() -> None:
    examples = [example_factory("old", age=25 * HOUR, offloads=100.0), example_factory("new", age=HOUR)]
    assert plan_eviction(examples, budget_bytes=10_000, now=NOW, ttl_s=24 * HOUR, decay_per_hour=0.9) == [
        "old"
    ]


@pytest.mark.parametrize(
    ("budget", "evicted"),
    [
        (400, []),
        (300, ["worthless"]),
        (200, ["worthless", "thin"]),
        (100, ["worthless", "thin", "dense"]),  # "gem" has the best value per byte
    ],
)
def test_eviction_keeps_the_highest_value_per_byte(budget: int, evicted: list[str]) -> None:
    examples = [
        example_factory("gem", size=100, offloads=10.0),  # 0.10 / byte
        example_factory("dense", size=100, offloads=5.0),  # 0.05 / byte
        example_factory("thin", size=100, offloads=1.0),  # 0.01 / byte
        example_factory("worthless", size=100, offloads=0.0),
    ]
    got = plan_eviction(examples, budget_bytes=budget, now=NOW, ttl_s=24 * HOUR, decay_per_hour=0.9)
    assert got == evicted


def test_eviction_uses_decayed_value() -> None:
    examples = [
        example_factory("stale-fame", size=100, offloads=10.0, updated_age=48 * HOUR),  # 10 * 0.9^48 ~ 0.06
        example_factory("steady", size=100, offloads=1.0),
    ]
    got = plan_eviction(examples, budget_bytes=100, now=NOW, ttl_s=100 * HOUR, decay_per_hour=0.9)
    assert got == ["stale-fame"]


def test_unusable_examples_go_first() -> None:
    examples = [example_factory("bad", offloads=50.0, usable=False), example_factory("ok", offloads=1.0)]
    assert plan_eviction(examples, budget_bytes=100, now=NOW, ttl_s=24 * HOUR, decay_per_hour=0.9) == ["bad"]


def test_one_big_valuable_example_beats_many_small_cheap_ones() -> None:
    examples = [
        example_factory("big", size=1000, offloads=50.0),
        example_factory("tiny", size=10, offloads=1.0),
    ]
    # greedy by density keeps "tiny" (0.1/B) and then "big" (0.05/B) no longer fits: the fix-up wins
    assert plan_eviction(examples, budget_bytes=1000, now=NOW, ttl_s=24 * HOUR, decay_per_hour=0.9) == [
        "tiny"
    ]


@pytest.mark.parametrize("seed", range(20))
def test_eviction_fits_and_is_within_half_of_the_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    examples = [
        example_factory(f"e{i}", size=int(rng.integers(10, 400)), offloads=float(rng.uniform(0, 20)))
        for i in range(9)
    ]
    budget = int(sum(e.stored_bytes for e in examples) * rng.uniform(0.2, 0.8))
    evicted = set(plan_eviction(examples, budget_bytes=budget, now=NOW, ttl_s=24 * HOUR, decay_per_hour=0.9))
    kept = [e for e in examples if e.example_id not in evicted]
    assert sum(e.stored_bytes for e in kept) <= budget
    best = max(
        sum(e.offloads for e in subset)
        for r in range(len(examples) + 1)
        for subset in itertools.combinations(examples, r)
        if sum(e.stored_bytes for e in subset) <= budget
    )
    assert sum(e.offloads for e in kept) >= 0.5 * best
