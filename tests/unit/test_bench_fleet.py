"""bench/fleet and bench/baselines.py: the pure parts (conditions, lengths, cache simulation, driver)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench.baselines import Scheduled, open_loop, simulate_semantic_cache
from bench.calibrate import ASSUMED_QUALITY
from bench.fleet import PRESETS, bank_answer, condition_of, token_lengths
from bench.report import RequestResult


@pytest.mark.parametrize(
    ("tier", "examples", "expected"),
    [
        ("large", ["a"], "large"),
        ("small", [], "small_alone"),
        ("small", ["x", "a"], "small_match"),
        ("small", ["x", "y"], "small_related"),
        ("small", ["unknown"], "small_related"),
    ],
)
def test_condition_of(tier: str, examples: list[str], expected: str) -> None:
    group_of = {"a": "g1", "x": "g2", "y": "g3"}
    assert (
        condition_of(tier=tier, large_tier="large", example_ids=examples, group_of=group_of, group="g1")
        == expected
    )


def test_token_lengths_are_seeded_and_bounded() -> None:
    a = token_lengths(500, median=160, sigma=0.5, seed=0)
    assert a == token_lengths(500, median=160, sigma=0.5, seed=0)
    assert a != token_lengths(500, median=160, sigma=0.5, seed=1)
    assert min(a) >= 16 and max(a) <= 512
    assert 130 <= float(np.median(a)) <= 190


def test_bank_answer_length_follows_tokens() -> None:
    text = bank_answer("How do I reset my password?", 100)
    assert text.startswith("Answer to: How do I reset my password?") and len(text) == 400


def test_presets_give_every_system_the_same_slots() -> None:
    for preset in PRESETS.values():
        assert 0 < preset.echolm_small < preset.slots
        assert preset.burst_peak * preset.burst_fraction < 1


def _unit(v: list[float]) -> np.ndarray:
    x = np.asarray(v, dtype=np.float64)
    return x / np.linalg.norm(x)


def test_simulate_semantic_cache_hits_admits_and_judges() -> None:
    bank = np.vstack([_unit([1, 0, 0]), _unit([0, 1, 0])])
    stream = np.vstack([_unit([1, 0.1, 0]), _unit([0, 0, 1]), _unit([0, 0.05, 1]), _unit([0.1, 1, 0])])
    groups = ["a", "c", "c", "x"]  # the last is close to bank entry "b" but is another question
    rows = simulate_semantic_cache(bank, ["a", "b"], stream, groups, [0.9, 1.01], ASSUMED_QUALITY)
    high, never = rows
    # at 0.9: hit (a), miss (c, stored), hit on the stored c, hit on b but wrong group
    assert high["hit_rate"] == pytest.approx(3 / 4)
    assert high["hit_precision"] == pytest.approx(2 / 3)
    q = ASSUMED_QUALITY
    assert high["quality"] == pytest.approx((2 * q.cache_match + q.large + q.cache_other) / 4)
    assert never["hit_rate"] == 0.0 and never["quality"] == pytest.approx(0.5)
    assert simulate_semantic_cache(bank, ["a", "b"], stream[:0], [], [0.5], q) == []


async def test_open_loop_keeps_the_schedule_and_reports_timeouts() -> None:
    schedule = [Scheduled(f"r{i}", "g", "t", at=0.05 * i, max_new_tokens=1) for i in range(4)]

    async def handle(item: Scheduled, clock: Callable[[], float]) -> RequestResult:
        sent = clock()
        if item.request_id == "r3":
            await asyncio.sleep(10)
        await asyncio.sleep(0.01)
        return RequestResult(
            system="s",
            phase="p",
            request_id=item.request_id,
            group_id="g",
            arrival_s=item.at,
            sent_s=sent,
            done_s=clock(),
            ok=True,
        )

    out = await open_loop(schedule, handle, system="s", phase="p", timeout_s=0.3)
    assert [r.request_id for r in out] == ["r0", "r1", "r2", "r3"]
    assert all(r.ok for r in out[:3]) and not out[3].ok and out[3].system == "s"
    assert all(r.sent_s >= r.arrival_s - 0.01 for r in out[:3])  # never early


def test_primary_quality_takes_small_match_from_the_paper_only(tmp_path: Path) -> None:
    from bench.fleet import PRIMARY_QUALITY, offline_quality_model

    assert PRIMARY_QUALITY.small_match == 0.56
    assert PRIMARY_QUALITY.sources["small_match"].startswith("PAPER:")
    for cell in ("small_alone", "small_related", "cache_match", "cache_other", "large", "failed"):
        assert PRIMARY_QUALITY.quality(cell) == ASSUMED_QUALITY.quality(cell)
        assert PRIMARY_QUALITY.sources.get(cell) == ASSUMED_QUALITY.sources.get(cell)
    assert offline_quality_model(PRIMARY_QUALITY, results_dir=tmp_path) is PRIMARY_QUALITY
    assert PRESETS["small"].load_q0 is None  # the routing default (2 waiting requests)


def test_bench_all_runs_only_modules_that_exist() -> None:
    import importlib.util

    from bench.cli import all_commands, build_parser

    commands = all_commands("small")
    assert len(commands) >= 8
    for command in commands:
        assert command[1] == "-m" and importlib.util.find_spec(command[2]) is not None, command
        if command[2] == "bench.cli":  # its sub-commands parse
            build_parser().parse_args(command[3:])
