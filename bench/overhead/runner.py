"""One overhead run, phase by phase: stack up, bank, components alone, then the pipeline at a low
rate, at the steady rate and in a saturation burst; every process it started is stopped at the end."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.policy.prompt import build_messages
from agents.policy.retrieval import Selected
from bench.floors import embed_floor, measure_floors, milvus_sweep
from bench.hostfacts import host_facts, loadavg, metadata
from bench.overhead.bank import preload, wait_for_index
from bench.overhead.components import direct_baseline, embed_batching, fetch_wait_floor, micro
from bench.overhead.config import INSTANT_BACKEND, PRESETS
from bench.overhead.cpu import cpu_delta, cpu_snapshot, settle
from bench.overhead.repeat import parse_variant, peer_phases, pipeline_phases, summarise, with_overrides
from bench.overhead.workload import question
from devstack.localstack import LocalStack, create_topics, free_port
from infra.embedding import SentenceTransformerEmbedder
from infra.milvus import MilvusExampleStore
from infra.protocols import Embedder, Example
from infra.settings import Settings, load_settings, parse_overrides
from streams.topology import topic_specs

__all__ = ["run"]


def _set_overrides(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    try:
        return parse_overrides(pairs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def _embedder(settings: Settings) -> Embedder:
    """The worker's embedder for ``settings``, cache off (a floor measures the model)."""
    emb = settings.embedding.model_copy(update={"cache_size": 0})
    if emb.backend == "onnx":
        from infra.embedding_onnx import OnnxEmbedder

        return OnnxEmbedder(emb)
    return SentenceTransformerEmbedder(emb)


async def _floors(
    report: dict[str, Any],
    settings: Settings,
    prompts: list[str],
    vectors: np.ndarray,
    bank: list[Example],
    others: Sequence[Settings] = (),
) -> None:
    """Each component alone on this bank and stack, with the worker's settings (``bench.floors``);
    the embed floor also for every other embedding backend a variant uses (``embed_ms_by_backend``)."""
    alone = _embedder(settings)
    selected = [Selected(e, 0.8, 0.6) for e in bank[: settings.selection.max_examples]]
    messages = build_messages(settings.tgi.system_prompt, selected, prompts[0])
    c0, t0 = cpu_snapshot(), time.perf_counter()
    async with MilvusExampleStore(settings.milvus) as store:
        await alone.embed(["warm-up"])
        report["floors"] = await measure_floors(
            settings,
            embedder=alone,
            store=store,
            tenant="bench",
            texts=prompts,
            vectors=vectors,
            messages=messages,
        )
    await alone.aclose()
    by_backend = {settings.embedding.backend: report["floors"]["embed_ms"]}
    for other in others:
        if other.embedding.backend not in by_backend:
            extra = _embedder(other)
            await extra.embed(["warm-up"])
            by_backend[other.embedding.backend] = await embed_floor(extra, prompts)
            await extra.aclose()
    report["floors"]["embed_ms_by_backend"] = by_backend
    report["floors"]["cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
    report["milvus_sweep"] = await milvus_sweep(
        settings.milvus.uri, settings.milvus.collection, "bench", vectors, limit=settings.selection.top_k
    )
    tqdm.write(f"[floors] {json.dumps({k: v for k, v in report['floors'].items() if k != 'cpu'})}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    preset = replace(
        preset,
        **{k: v for k, v in {
            "examples": args.examples, "rate": args.rate, "duration_s": args.duration,
            "low_rate": args.low_rate, "saturate": args.saturate, "micro_iterations": args.micro_iterations,
        }.items() if v is not None},
    )  # fmt: skip
    rng = np.random.default_rng(args.seed)
    tag = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="echolm-overhead-"))
    overrides = _set_overrides(args.set)
    if args.fetch_max_wait_ms is not None:  # alias of --set kafka.fetch_max_wait_ms=MS
        overrides.setdefault("kafka", {})["fetch_max_wait_ms"] = args.fetch_max_wait_ms
    sections: dict[str, dict[str, Any]] = {
        "kafka": {"topic_prefix": f"ovh{tag}"},
        "milvus": {"collection": f"ovh{tag}"},
        "worker": {"app_id": f"ovh{tag}", "metrics_port": free_port(), "data_dir": str(data_dir / "worker")},
        "stack": {"data_dir": str(data_dir)},
    }
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    started = time.time()
    report: dict[str, Any] = {
        **metadata("overhead", command=getattr(args, "command", None), started_at=started, wall_s=None),
        "machine": host_facts(loadavg_start=loadavg()),
        "preset": args.preset, "seed": args.seed, "config": asdict(preset), "overrides": overrides,
        "fetch_max_wait_ms": load_settings(**{k: v for k, v in overrides.items() if k == "kafka"})
        .kafka.fetch_max_wait_ms,
    }  # fmt: skip
    base = load_settings(**sections)
    stack = LocalStack(
        base, milvus="server", ephemeral=True, data_dir=data_dir, backend_engine="emulated",
        backend_args=INSTANT_BACKEND, progress=lambda m: tqdm.write(f"[stack] {m}"),
    )  # fmt: skip
    began = time.perf_counter()
    try:
        await stack.start()
        settings = stack.apply(base)
        await create_topics(settings.kafka.bootstrap_servers, topic_specs(settings))
        # The bench's own embedder (bank and query vectors) uses one torch thread: fastest on shared cores.
        embedder = SentenceTransformerEmbedder(settings.embedding.model_copy(update={"threads": 2}))
        await embedder.warmup()
        real, bank, bank_timings = await preload(settings, embedder, preset, rng)
        timings: dict[str, Any] = bank_timings  # plus the index and settle reports below
        # Index building and compaction after the bulk load: a phase of its own, never measured with others.
        c0, t0 = cpu_snapshot(), time.perf_counter()
        timings["index"] = await asyncio.to_thread(
            wait_for_index, settings, preset.examples, preset.index_timeout_s
        )
        timings["milvus_settle"] = await asyncio.to_thread(settle, "milvus", preset.index_timeout_s)
        timings["index_phase_cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
        report["bank"] = {"examples": preset.examples, "real_embeddings": len(bank), **timings}
        tqdm.write(f"[bank] {json.dumps(report['bank'])}")

        prompts = [question(rng) for _ in range(200)]
        qvecs = await embedder.embed(prompts)
        queries = list(zip(prompts, qvecs, strict=True))
        await embedder.aclose()
        if not args.pipeline_only:
            c0, t0 = cpu_snapshot(), time.perf_counter()
            report["micro"], hit_sets = micro(settings, real, bank, queries, preset.micro_iterations)
            report["micro"]["cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
            c0, t0 = cpu_snapshot(), time.perf_counter()
            report["embed_batching"] = await embed_batching(settings, prompts[:32])
            report["embed_batching"]["cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
            selected = [
                Selected(h.example, h.similarity, 0.6) for h in hit_sets[0][: settings.selection.max_examples]
            ]
            messages = build_messages(settings.tgi.system_prompt, selected, prompts[0])
            c0, t0 = cpu_snapshot(), time.perf_counter()
            report["direct"] = await direct_baseline(
                settings, messages, preset.rate, preset.baseline_s, preset.max_new_tokens
            )
            report["direct"]["cpu"] = cpu_delta(c0, cpu_snapshot(), time.perf_counter() - t0)
            tqdm.write(f"[micro] {json.dumps(report['micro'])}\n[direct] {json.dumps(report['direct'])}")

            report["fetch_wait_floor_ms"] = await fetch_wait_floor(
                settings.kafka.bootstrap_servers, (1500, 500, 100, 25, 10, 5)
            )
            tqdm.write(f"[fetch wait] {json.dumps(report['fetch_wait_floor_ms'])}")
        variants = [("default", {}), *(parse_variant(v) for v in args.variant)]
        if args.floors:
            others = [with_overrides(settings, o) for _, o in variants[1:]]
            await _floors(report, settings, prompts, qvecs, bank, others)
        runs: list[dict[str, Any]] = []
        for i in range(args.runs):
            for name, overrides in variants:
                tqdm.write(f"[run {i + 1}/{args.runs}] pipeline, variant {name}")
                chosen = with_overrides(settings, overrides)
                phases = await pipeline_phases(chosen, preset, rng, data_dir / f"worker-{name}-{i}.log")
                runs.append(
                    {"run": i, "variant": name, "embedding_backend": chosen.embedding.backend, **phases}
                )
            if args.peer:
                tqdm.write(f"[run {i + 1}/{args.runs}] in-process peer ({variants[-1][0]} settings)")
                peer = await peer_phases(with_overrides(settings, variants[-1][1]), preset, rng)
                runs.append({"run": i, "variant": "peer", **peer})
        first = runs[0]
        report.update({k: v for k, v in first.items() if k not in ("run", "variant", "embedding_backend")})
        report["runs"] = runs
        report["summary"] = summarise(runs, report.get("floors"), report.get("micro"))
    finally:
        await stack.stop()
        report["wall_s"] = time.perf_counter() - began
        report["machine"]["loadavg_end"] = loadavg()
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            report["data_dir"] = str(data_dir)
    return report
