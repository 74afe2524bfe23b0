"""bench/quality_cells.py: reading the measured cells and carrying their uncertainty."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.quality_cells import PAPER_SMALL_MATCH, PLACEHOLDER, QualityCells


def _cell(win: float, low: float, high: float, n: int = 100) -> dict[str, Any]:
    return {
        "n": n,
        "cosine": {"mean": 0.7, "ci_low": 0.6, "ci_high": 0.8},
        "vs_large": {"n": n, "win_rate": win, "win_ci": [low, high]},
    }


DATA: dict[str, Any] = {
    "schema": "echolm.quality-cells.v1",
    "cells": {
        "large": {"n": 100, "cosine": {"mean": 0.8, "ci_low": 0.7, "ci_high": 0.9}, "vs_large": None},
        "small": _cell(0.30, 0.25, 0.35),
        "small_two_stage": _cell(0.46, 0.40, 0.52),
        "semantic_cache": _cell(0.20, 0.10, 0.30),
    },
}


def test_reads_the_schema_and_maps_conditions() -> None:
    q = QualityCells.from_json(DATA, source="test")
    assert q.cell("small_match") == q.cell("small_related")
    assert q.cell("small_match").win_rate == 0.46  # type: ignore[union-attr]
    assert q.cell("large").win_rate == 0.5  # type: ignore[union-attr]
    assert q.cell("large_examples") == q.cell("large")  # not measured: the large model alone
    assert q.cell("failed") is None
    with pytest.raises(ValueError, match="unknown serving condition"):
        q.cell("medium")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="v0"), "schema"),
        (lambda d: d["cells"].pop("small"), "no measured cell"),
    ],
)
def test_rejects_wrong_files(mutate: Any, message: str) -> None:
    data = {"schema": DATA["schema"], "cells": dict(DATA["cells"])}
    mutate(data)
    with pytest.raises(ValueError, match=message):
        QualityCells.from_json(data, source="test")


@pytest.mark.parametrize(
    ("counts", "mean"),
    [
        ({"large": 10}, 0.5),
        ({"small_match": 5, "large": 5}, 0.48),
        ({"small_alone": 1, "failed": 1}, 0.15),  # a failure scores 0
    ],
)
def test_score_mixes_cells_by_share(counts: dict[str, int], mean: float) -> None:
    scored = QualityCells.from_json(DATA, source="test").score(counts)
    assert scored.mean == pytest.approx(mean)
    assert scored.ci_low <= scored.mean <= scored.ci_high


def test_interval_carries_cell_and_routing_uncertainty() -> None:
    q = QualityCells.from_json(DATA, source="test")
    all_large = q.score({"large": 1000})
    assert all_large.ci_high - all_large.ci_low == pytest.approx(0.0)  # exact cell, one condition
    one_cell = q.score({"small_match": 1000})
    se = (0.52 - 0.40) / (2 * 1.959964)
    assert one_cell.ci_high - one_cell.mean == pytest.approx(1.959964 * se)  # the cell's own CI
    mixed = q.score({"small_match": 500, "large": 500})
    routing = math.sqrt(0.5 * 0.02**2 + 0.5 * 0.02**2) / math.sqrt(1000)
    expected = 1.959964 * math.sqrt((0.5 * se) ** 2 + routing**2)
    assert mixed.ci_high - mixed.mean == pytest.approx(expected)


def test_sensitivity_row_and_placeholder_are_labelled() -> None:
    q = QualityCells.from_json(DATA, source="measured: test")
    paper = q.with_small_match(PAPER_SMALL_MATCH, "PAPER")
    assert paper.score({"small_match": 10}).mean == pytest.approx(0.56)
    assert "PAPER" in paper.source and "measured" in paper.source
    assert PLACEHOLDER.source.startswith("PLACEHOLDER")
    assert PLACEHOLDER.score({"small_alone": 3}).source.startswith("PLACEHOLDER")


def test_load_names_the_missing_file(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match="placeholder"):
        QualityCells.load(tmp_path / "quality-cells.json")


def test_as_quality_model_takes_the_point_estimates() -> None:
    model = QualityCells.from_json(DATA, source="measured: test").as_quality_model()
    assert model.quality("small_match") == model.quality("small_related") == 0.46
    assert model.quality("cache_other") == 0.20 and model.quality("large") == 0.5
    assert "measured: test" in model.sources["small_alone"]
