"""Measured helpfulness: utility labels from real score pairs, cells -> priors, the priors loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.policy.bandit import MeasuredPrior, tier_priors
from agents.policy.features import FEATURE_NAMES
from agents.priors import SHIPPED_PRIORS, load_priors, parse_priors
from bench.quality_priors import priors_from_cells
from bench.utility_labels import example_labels, train_utility
from infra.settings import BackendSettings, RoutingSettings

F = [0.5] * len(FEATURE_NAMES)


# (score alone, score with examples, examples shown) -> label of each example, weight of each
@pytest.mark.parametrize(
    ("alone", "with_", "shown", "label", "weight"),
    [
        (0.60, 0.70, 2, 1.0, 0.5),  # raised by more than the tie margin: helped
        (0.60, 0.61, 1, 0.0, 1.0),  # within the margin: a tie is not help
        (0.60, 0.50, 3, 0.0, 1 / 3),  # lowered: did not help
    ],
)
def test_labels_say_whether_the_examples_raised_the_small_models_score(
    alone: float, with_: float, shown: int, label: float, weight: float
) -> None:
    rows = example_labels([{"score_alone": alone, "score_with": with_, "features": [F] * shown}])
    assert rows.x.shape == (shown, len(FEATURE_NAMES))
    assert rows.y.tolist() == [label] * shown and rows.weight == pytest.approx([weight] * shown)


def test_requests_without_examples_add_no_rows_and_bad_features_are_refused() -> None:
    assert example_labels([{"score_alone": 0.1, "score_with": 0.9, "features": []}]).x.shape == (0, 10)
    with pytest.raises(ValueError, match="features"):
        example_labels([{"score_alone": 0.1, "score_with": 0.9, "features": [[1.0]]}])


def test_training_learns_that_similar_examples_help() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        sim = float(rng.uniform(0.3, 1.0))
        f = list(F)
        f[0] = sim
        rows.append({"score_alone": 0.5, "score_with": 0.5 + (0.1 if sim > 0.7 else -0.05), "features": [f]})
    model = train_utility(rows)
    hi, lo = list(F), list(F)
    hi[0], lo[0] = 0.95, 0.4
    assert model.predict(np.asarray([hi]))[0] > 0.5 > model.predict(np.asarray([lo]))[0]


def cells_file(small: float, small_ts: float, large_ts: float, shown: int, total: int) -> dict[str, Any]:
    def cell(win: float) -> dict[str, Any]:
        return {"n": total, "vs_large": {"win_rate": win}}

    return {
        "schema": "echolm.quality-cells.v1",
        "cells": {"small": cell(small), "small_two_stage": cell(small_ts), "large": {"n": total},
                  "large_two_stage": cell(large_ts)},
        "by_bin": {"a": {"n_large": total, "two_stage_with_examples": shown}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("cells", "small", "large"),
    [
        (cells_file(0.30, 0.40, 0.52, 100, 100), (0.30, 0.40), (0.5, 0.52)),
        (cells_file(0.30, 0.40, 0.52, 50, 100), (0.30, 0.50), (0.5, 0.54)),  # half shown: gain x2
        (cells_file(0.30, 0.20, 0.45, 25, 100), (0.30, 0.0), (0.5, 0.30)),  # hurt, clipped at 0
    ],
)
def test_cells_become_priors_on_the_win_rate_scale(
    cells: dict[str, Any], small: tuple[float, float], large: tuple[float, float]
) -> None:
    priors = parse_priors(json.loads(json.dumps(priors_from_cells(cells))))
    assert (priors["small"].alone, priors["small"].with_examples) == pytest.approx(small)
    assert (priors["large"].alone, priors["large"].with_examples) == pytest.approx(large)


def test_an_explicit_quality_prior_wins_over_the_measured_file() -> None:
    measured = {"small": MeasuredPrior(0.3, 0.4), "large": MeasuredPrior(0.5, 0.6)}
    backends = [
        BackendSettings(name="s", url="http://s", tier="small"),
        BackendSettings(name="l", url="http://l", tier="large", quality_prior=0.8),
    ]
    assert tier_priors(backends, measured) == ({"small": 0.3, "large": 0.8}, {"small": 0.4})


def test_the_loader_reads_the_shipped_file_and_refuses_bad_ones(tmp_path: Path) -> None:
    assert set(load_priors(RoutingSettings())) == {"small", "large"}
    assert SHIPPED_PRIORS.is_file() and load_priors(RoutingSettings(measured_priors=False)) == {}
    with pytest.raises(FileNotFoundError, match="quality_priors"):
        load_priors(RoutingSettings(priors_file=tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "echolm.router-priors.v1", "tiers": {"small": {"alone": 2}}}))
    with pytest.raises(ValueError, match=r"tiers\.small\.alone"):
        load_priors(RoutingSettings(priors_file=bad))


def test_measured_priors_survive_the_settings_round_trip_to_worker_processes() -> None:
    # echolm up hands settings to workers as JSON (child_env): an unset quality_prior must stay unset
    measured = {"small": MeasuredPrior(0.3, 0.4), "large": MeasuredPrior(0.5, 0.6)}
    backends = [
        BackendSettings(name="s", url="http://s", tier="small"),
        BackendSettings(name="l", url="http://l", tier="large"),
    ]
    copied = [BackendSettings.model_validate_json(b.model_dump_json()) for b in backends]
    assert tier_priors(copied, measured) == ({"small": 0.3, "large": 0.5}, {"small": 0.4, "large": 0.6})
