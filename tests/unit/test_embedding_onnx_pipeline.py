"""``OnnxEmbedder`` implements Transformer -> mean Pooling -> Normalize only: other pipelines are
refused with a message naming what differs (no model load, no onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.embedding_onnx import _check_pipeline, onnx_file_for
from infra.errors import DependencyUnavailable


def model_dir(tmp_path: Path, *, pooling: dict[str, bool], normalize: bool = True, seq: int = 256) -> Path:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 384, **pooling})
    )
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": seq}))
    return tmp_path


def test_mean_pooling_with_normalize_is_accepted(tmp_path: Path) -> None:
    folder = model_dir(
        tmp_path, pooling={"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, seq=128
    )
    assert _check_pipeline(folder) == 128


@pytest.mark.parametrize(
    ("pooling", "normalize"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, True),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, True),
        ({"pooling_mode_mean_tokens": True}, False),
    ],
)
def test_other_pipelines_are_refused(tmp_path: Path, pooling: dict[str, bool], normalize: bool) -> None:
    with pytest.raises(DependencyUnavailable, match=r"embedding\.backend=.torch."):
        _check_pipeline(model_dir(tmp_path, pooling=pooling, normalize=normalize))


def test_the_export_is_keyed_by_the_weights(tmp_path: Path) -> None:
    with pytest.raises(DependencyUnavailable, match="no transformer weights"):
        onnx_file_for(tmp_path, tmp_path / "out")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 10)
    first = onnx_file_for(tmp_path, tmp_path / "out")
    weights.write_bytes(b"x" * 11)
    assert onnx_file_for(tmp_path, tmp_path / "out") != first
    assert first.parent == tmp_path / "out" and first.suffix == ".onnx"
