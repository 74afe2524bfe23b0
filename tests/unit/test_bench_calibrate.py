"""bench/calibrate.py and bench/gpu_calibrate.py: fits, service-time arithmetic, the quality model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.calibrate import (
    ASSUMED_QUALITY,
    CONDITIONS,
    QualityModel,
    TierService,
    fit_slowdown,
    load_gpu_services,
    quality_model_from_selection,
)
from bench.gpu_calibrate import MODELS, fit_batch_slowdown, fit_prefill


def test_fit_slowdown_recovers_a_linear_model() -> None:
    batches = [1, 4, 8, 32]
    steps = [2.0 * (1 + 0.01 * (b - 1)) for b in batches]
    assert fit_slowdown(batches, steps) == pytest.approx(0.01)
    assert fit_batch_slowdown(batches, steps) == pytest.approx(0.01)
    assert fit_slowdown([1], [3.0]) == 0.0
    assert fit_slowdown([1, 8], [3.0, 2.0]) == 0.0  # never negative


def test_fit_prefill_is_a_least_squares_line() -> None:
    fit = fit_prefill([128, 512, 2048], [1.0 + 0.03 * t for t in (128, 512, 2048)])
    assert fit["ms_per_token"] == pytest.approx(0.03)
    assert fit["fixed_ms"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two"):
        fit_prefill([128], [1.0])


def test_model_shapes_match_the_llama_sizes() -> None:
    assert MODELS["1B"].params == pytest.approx(1.24e9, rel=0.01)
    assert MODELS["3B"].params == pytest.approx(3.21e9, rel=0.01)
    assert MODELS["8B"].params == pytest.approx(8.03e9, rel=0.01)
    assert MODELS["8B"].kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2


def test_tier_service_arithmetic_and_emulator_arguments() -> None:
    s = TierService("x", prefill_ms_per_token=0.1, decode_ms_per_token=10.0, batch_slowdown=0.1, source="t")
    assert s.request_s(100, 50) == pytest.approx((100 * 0.1 + 50 * 10.0) / 1000)
    assert s.request_s(100, 50, batch=3) == pytest.approx(1.2 * (100 * 0.1 + 50 * 10.0) / 1000)
    assert s.capacity_rps(0, 100, batch=1) == pytest.approx(1.0)
    args = s.emulator_args(time_scale=2.0)
    assert args[args.index("--decode-ms-per-token") + 1] == "20.000000"
    assert args[args.index("--batch-slowdown") + 1] == "0.100000"  # a ratio: not scaled


def test_gpu_services_from_json_and_fallback(tmp_path: Path) -> None:
    missing = load_gpu_services(tmp_path / "none.json")
    assert "estimated" in missing["8B"].source.lower()
    assert missing["8B"].decode_ms_per_token == pytest.approx(8.18)
    path = tmp_path / "gpu.json"
    derived = {"prefill_ms_per_token": 0.03, "decode_ms_per_token": 7.4, "batch_slowdown": 0.005}
    path.write_text(json.dumps({"info": {"gpu": "H100"}, "models": {"8B": {"derived": derived}}}))
    measured = load_gpu_services(path)
    assert measured["8B"].decode_ms_per_token == 7.4 and measured["8B"].source.startswith("measured: H100")


def test_quality_model_validates_and_round_trips() -> None:
    assert ASSUMED_QUALITY.quality("large") == 0.5
    assert ASSUMED_QUALITY.quality("failed") == 0.0
    table = ASSUMED_QUALITY.table()
    assert set(table) == set(CONDITIONS)
    again = QualityModel.from_table(table)
    assert all(again.quality(c) == ASSUMED_QUALITY.quality(c) for c in CONDITIONS)
    with pytest.raises(ValueError, match="win rate"):
        QualityModel(small_alone=1.5, small_match=0.5, small_related=0.5, cache_match=0.5, cache_other=0.5)
    with pytest.raises(ValueError, match="unknown condition"):
        ASSUMED_QUALITY.quality("medium")  # type: ignore[arg-type]


def _row(
    rid: str, scores: dict[str, float], two_stage: list[str], similarity: list[str]
) -> dict[str, object]:
    return {
        "request_id": rid,
        "scores": scores,
        "examples": {"two-stage": two_stage, "similarity": similarity},
    }


def test_quality_model_from_selection_cells_and_fallback() -> None:
    rows = []
    for i in range(4):  # same-group examples that win, cache hits on the same group that tie
        rows.append(
            _row(
                f"g{i}/1",
                {"large-resample": 0.5, "none": 0.3, "two-stage": 0.7, "semantic-cache": 0.51},
                [f"x{i}/0", f"g{i}/0"],
                [f"x{i}/0", f"g{i}/0"],
            )
        )
    for i in range(4):  # unrelated examples that lose, cache hits on other groups that lose
        rows.append(
            _row(
                f"h{i}/1",
                {"large-resample": 0.5, "none": 0.5, "two-stage": 0.2, "semantic-cache": 0.1},
                [f"x{i}/0"],
                [f"x{i}/0"],
            )
        )
    model, stats = quality_model_from_selection({"preset": {"tie": 0.02}, "requests": rows})
    assert model.small_match == 1.0 and model.small_related == 0.0
    assert model.cache_match == 0.5 and model.cache_other == 0.0
    assert model.small_alone == pytest.approx((4 * 0.0 + 4 * 0.5) / 8)
    assert stats["small_match"]["n"] == 4 and stats["small_match"]["ci_low"] < 1.0
    assert "measured offline" in model.sources["small_match"]
    few, few_stats = quality_model_from_selection({"requests": rows[:2]}, min_n=3)
    assert few.small_related == ASSUMED_QUALITY.small_related and "only 0" in few.sources["small_related"]
    assert math.isnan(few_stats["small_related"]["win_rate"])
