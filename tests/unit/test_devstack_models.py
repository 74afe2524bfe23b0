"""``devstack.models``: which GGUF each dev backend of ``echolm up`` serves (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.models import QWEN_PAIR, SMOLLM2, ModelsMissing, choose_models
from infra.settings import load_settings


def pair_dir(tmp_path: Path, *, large: bool = True) -> Path:
    (tmp_path / QWEN_PAIR["small"]).write_bytes(b"gguf")
    if large:
        (tmp_path / QWEN_PAIR["large"]).write_bytes(b"gguf")
    return tmp_path


@pytest.mark.parametrize("models", ["auto", "qwen-pair"])
def test_the_pair_serves_one_model_per_tier_when_present(tmp_path: Path, models: str) -> None:
    choice = choose_models(load_settings(stack={"models": models, "models_dir": str(pair_dir(tmp_path))}))
    assert choice.ggufs == {
        "small-0": tmp_path / QWEN_PAIR["small"],
        "large-0": tmp_path / QWEN_PAIR["large"],
    }
    assert "0.5B" in choice.labels["small-0"] and "1.5B" in choice.labels["large-0"] and not choice.note


def test_auto_without_the_pair_serves_smollm2_and_says_how_to_get_it(tmp_path: Path) -> None:
    choice = choose_models(load_settings(stack={"models_dir": str(pair_dir(tmp_path, large=False))}))
    assert choice.ggufs == {"small-0": None, "large-0": None}  # the dev server's default: SmolLM2
    assert set(choice.labels.values()) == {SMOLLM2}
    assert "scripts/models.sh" in choice.note and QWEN_PAIR["large"] in choice.note


def test_qwen_pair_without_the_files_refuses_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelsMissing, match=r"scripts/models\.sh.*ECHOLM_STACK__MODELS=smollm2"):
        choose_models(load_settings(stack={"models": "qwen-pair", "models_dir": str(tmp_path)}))


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        ({"models": "smollm2"}, None),  # tests: SmolLM2 even when the pair is there
        ({"gguf_path": "/models/one.gguf"}, Path("/models/one.gguf")),  # one file for every tier
    ],
)
def test_explicit_choices_win_over_the_pair(
    tmp_path: Path, stack: dict[str, str], expected: Path | None
) -> None:
    choice = choose_models(load_settings(stack={"models_dir": str(pair_dir(tmp_path)), **stack}))
    assert choice.ggufs == {"small-0": expected, "large-0": expected}
