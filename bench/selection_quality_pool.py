"""The evaluation's presets, its budgeted generation pool and job runner (split from
``bench/selection_quality.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from infra.protocols import ChatMessage, Generation, GenerationParams
from infra.tgi import TGIGenerator

__all__ = ["PRESETS", "BudgetExhausted", "GenerationPool", "Preset", "run_all", "seed_of"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Preset:
    n_eval: int  # evaluated live requests, one per group
    n_train: int  # training requests for the utility model, from other groups
    train_candidates: int  # examples tried one at a time per training request
    recall_k: int  # stage-1 neighbours
    k: int  # examples per prompt (every condition)
    best_of: int  # samples per "large-model" answer
    max_new_tokens: int
    tie: float = 0.02  # |score difference| at or below this is a tie (reference-score scale)
    temperature: float = 0.7
    bank_fraction: float = 0.5
    background: int = 0  # ShareGPT conversations added to the bank as distractors
    seed: int = 0


PRESETS = {
    # About 550 generations: ~5 minutes on 2 idle cores with two one-thread servers (estimated; under
    # heavy load from other jobs it took 4 pieces of --max-minutes 9, see BENCHMARKS.md).
    "small": Preset(n_eval=20, n_train=12, train_candidates=5, recall_k=6, k=3, best_of=2, max_new_tokens=48),
    # About 4,000 generations: about an hour on 2 cores; run it in bounded pieces with --max-minutes.
    "full": Preset(n_eval=100, n_train=60, train_candidates=5, recall_k=8, k=3, best_of=3, max_new_tokens=48),
}


class BudgetExhausted(Exception):
    """The run reached ``--max-minutes``; what it generated is cached, so rerunning continues."""


# ------------------------------------------------------------------------------------- generation
class GenerationPool:
    """Generators behind one queue (one request in flight per server), with a disk cache and a deadline."""

    def __init__(
        self, generators: Sequence[TGIGenerator], model_id: str, cache: Path | None, deadline: float
    ):
        self._free: asyncio.Queue[TGIGenerator] = asyncio.Queue()
        for g in generators:
            self._free.put_nowait(g)
        self.model_id = model_id
        self.deadline = deadline
        self.cache_path = cache
        self.cache: dict[str, dict[str, Any]] = {}
        self.generated = 0
        if cache is not None and cache.is_file():
            for line in cache.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    row = json.loads(line)
                    self.cache[row["key"]] = row

    def _key(self, messages: Sequence[ChatMessage], params: GenerationParams) -> str:
        blob = json.dumps(
            [self.model_id, [[m.role, m.content] for m in messages], asdict(params)], ensure_ascii=False
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    async def generate(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Generation:
        key = self._key(messages, params)
        hit = self.cache.get(key)
        if hit is None:
            generator = await self._free.get()
            try:
                if time.monotonic() > self.deadline:  # checked once a server is free, not when queued
                    raise BudgetExhausted
                out = await generator.generate(messages, params)
            finally:
                self._free.put_nowait(generator)
            hit = {
                "key": key,
                "text": out.text,
                "prompt_tokens": out.prompt_tokens,
                "generated_tokens": out.generated_tokens,
                "latency_s": out.latency_s,
            }
            self.cache[key] = hit
            self.generated += 1
            if self.cache_path is not None:
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(hit, ensure_ascii=False) + "\n")
        return Generation(
            text=hit["text"],
            backend="cache",
            generated_tokens=hit["generated_tokens"],
            prompt_tokens=hit["prompt_tokens"],
            latency_s=hit["latency_s"],
        )


async def run_all(label: str, jobs: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the jobs concurrently (the pool bounds real concurrency), in order, with a progress bar."""
    factories = list(jobs)
    results: list[T | None] = [None] * len(factories)
    with tqdm(total=len(factories), desc=label, unit="job", dynamic_ncols=True) as bar:

        async def one(i: int) -> None:
            results[i] = await factories[i]()
            bar.update(1)

        async with asyncio.TaskGroup() as group:
            for i in range(len(factories)):
                group.create_task(one(i))
    return results  # type: ignore[return-value]


def seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:4], "little")
