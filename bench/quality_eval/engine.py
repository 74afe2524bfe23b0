"""llama-cpp-python on the two GGUFs, behind the generation cache.

Both models are loaded once per process (mmap: 1.5B ~1.8 GB RSS, 0.5B ~0.6 GB) and run greedy
(temperature 0, fixed seed) through the GGUF's own chat template (``create_chat_completion``), with
``n_threads`` CPU threads. llama.cpp's perf counters give the prompt-evaluation time (prefill) apart from the
whole call. Every call goes through ``GenerationCache``: a key seen before is answered from it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.quality_eval.cache import CachedGeneration, GenerationCache, generation_key
from infra.protocols import ChatMessage

__all__ = ["MODELS", "Engine", "ModelFile", "params_for"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class ModelFile:
    name: str
    filename: str
    sha256: str

    def path(self, folder: Path | None = None) -> Path:
        return (folder or ROOT / ".echolm" / "models") / self.filename


MODELS: dict[str, ModelFile] = {
    "large": ModelFile(
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "small": ModelFile(
        "Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def params_for(max_new_tokens: int) -> dict[str, Any]:
    """The generation parameters that enter the cache key (greedy: the sampling knobs are inert)."""
    return {
        "engine": "llama-cpp-python",
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 1,
        "repeat_penalty": 1.0,
        "seed": 0,
        "n_ctx": 4096,
    }


def _file_ok(path: Path, sha256: str) -> bool:
    # size check is cheap; the full hash is scripts/models.sh's job and is trusted here
    return path.is_file() and path.stat().st_size > 0 and len(sha256) == 64


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class Engine:
    """Cached greedy chat completions of the ``small`` and ``large`` models."""

    def __init__(self, cache: GenerationCache, *, n_threads: int = 2, folder: Path | None = None) -> None:
        self.cache = cache
        self.n_threads = n_threads
        self.folder = folder
        self._llms: dict[str, Any] = {}
        self.generated = 0

    def key(self, tier: str, messages: Sequence[ChatMessage], params: Mapping[str, Any]) -> str:
        return generation_key(MODELS[tier].sha256, _as_dicts(messages), params)

    def _llm(self, tier: str, n_ctx: int) -> Any:
        if tier not in self._llms:
            import llama_cpp

            model = MODELS[tier]
            path = model.path(self.folder)
            if not _file_ok(path, model.sha256):
                raise FileNotFoundError(f"{path} is missing: run scripts/models.sh to assemble {model.name}")
            self._llms[tier] = llama_cpp.Llama(
                str(path),
                n_ctx=n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                seed=0,
                verbose=False,
            )
        return self._llms[tier]

    def cached(
        self, tier: str, messages: Sequence[ChatMessage], params: Mapping[str, Any]
    ) -> CachedGeneration | None:
        return self.cache.get(self.key(tier, messages, params))

    def generate(
        self, tier: str, messages: Sequence[ChatMessage], params: Mapping[str, Any]
    ) -> CachedGeneration:
        key = self.key(tier, messages, params)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        llm = self._llm(tier, int(params["n_ctx"]))
        _perf_reset(llm)
        started = time.perf_counter()
        out = llm.create_chat_completion(
            _as_dicts(messages),
            temperature=float(params["temperature"]),
            top_p=float(params["top_p"]),
            top_k=int(params["top_k"]),
            repeat_penalty=float(params["repeat_penalty"]),
            seed=int(params["seed"]),
            max_tokens=int(params["max_tokens"]),
        )
        total = time.perf_counter() - started
        text = str(out["choices"][0]["message"]["content"] or "")
        usage = out.get("usage") or {}
        prefill = _prefill_s(llm)
        hit = CachedGeneration(
            key=key,
            model=MODELS[tier].sha256,
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            ttft_s=prefill if prefill is not None else float("nan"),
            total_s=total,
            at=time.time(),
        )
        self.cache.put(hit)
        self.generated += 1
        return hit


def _perf_reset(llm: Any) -> None:
    import llama_cpp

    try:
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    except (AttributeError, TypeError):  # a llama-cpp-python without the perf API: no prefill time
        return


def _prefill_s(llm: Any) -> float | None:
    """Seconds llama.cpp spent evaluating the prompt in the last call (its own perf counters)."""
    import llama_cpp

    try:
        data = llama_cpp.llama_perf_context(llm._ctx.ctx)
    except (AttributeError, TypeError):
        return None
    return float(data.t_p_eval_ms) / 1000.0


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
