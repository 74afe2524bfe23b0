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
from bench.hostfacts import host_facts, loadavg, metadata
from bench.overhead.bank import preload, wait_for_index
from bench.overhead.components import direct_baseline, embed_batching, fetch_wait_floor, micro
from bench.overhead.config import INSTANT_BACKEND, PRESETS
from bench.overhead.cpu import cpu_delta, cpu_per_reply, cpu_snapshot, settle
from bench.overhead.drive import drain, drive
from bench.overhead.stages import analyse, scrape_stages, stage_deltas
from bench.overhead.workload import question
from devstack.localstack import LocalStack, create_topics, free_port
from devstack.workers import WorkerProcess
from echolm.client import EchoClient
from infra.embedding import SentenceTransformerEmbedder
from infra.settings import load_settings, parse_overrides
from streams.topology import topic_specs

__all__ = ["run"]


def _set_overrides(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    try:
        return parse_overrides(pairs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


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
    worker: WorkerProcess | None = None
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
        timings["index"] = await asyncio.to_thread(
            wait_for_index, settings, preset.examples, preset.index_timeout_s
        )
        timings["milvus_settle"] = await asyncio.to_thread(settle, "milvus", preset.index_timeout_s)
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
        worker = WorkerProcess(settings, log_path=data_dir / "worker.log", name="bench-worker")
        worker.start()
        await worker.wait_ready(timeout_s=120)
        port = settings.worker.metrics_port
        async with EchoClient(settings) as client:
            await drive(client, [question(rng) for _ in range(100)], rate=25, desc="warm-up",
                        max_new_tokens=preset.max_new_tokens, timeout_s=60)  # fmt: skip
            report["warmup_drain"] = await drain(client, 60)
            steps = ((preset.low_rate, preset.low_duration_s), (preset.rate, preset.duration_s))
            phases: list[tuple[str, list[str], float | None, float]] = [
                (f"steady@{rate:g}", [question(rng) for _ in range(int(rate * seconds))], rate, 30.0)
                for rate, seconds in steps
                if rate > 0
            ]
            burst = [question(rng) for _ in range(preset.saturate)]
            phases.append(("saturation", burst, None, preset.saturate_window_s))
            for name, prompts, rate, wait_s in phases:
                scrape0, cpu0, t0 = (
                    await asyncio.to_thread(scrape_stages, port),
                    cpu_snapshot(),
                    time.perf_counter(),
                )
                replies, send_s, elapsed = await drive(
                    client, prompts, rate=rate, desc=name if rate is None else f"{name} {rate:g} req/s",
                    max_new_tokens=preset.max_new_tokens, timeout_s=wait_s,
                )  # fmt: skip
                scrape1, cpu1, t1 = (
                    await asyncio.to_thread(scrape_stages, port),
                    cpu_snapshot(),
                    time.perf_counter(),
                )
                report[name] = {
                    "rate": rate, "sent": len(prompts), "send_s": send_s, "sent_per_s": len(prompts) / send_s,
                    "elapsed_s": elapsed, **analyse(replies, elapsed),
                    "worker_metrics_ms": stage_deltas(scrape0, scrape1),
                    "cpu": cpu_per_reply(cpu_delta(cpu0, cpu1, t1 - t0), t1 - t0, len(replies)),
                }  # fmt: skip
                if name != "saturation":  # a backlog left by this phase would skew the next one
                    report[name]["drain"] = await drain(client, preset.saturate_window_s)
            report["client_duplicates"] = client.duplicates
    finally:
        if worker is not None:
            report["worker_exit"] = await worker.stop(timeout_s=20)
            report["worker_log_tail"] = worker.log_tail(15).splitlines()
        await stack.stop()
        report["wall_s"] = time.perf_counter() - began
        report["machine"]["loadavg_end"] = loadavg()
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            report["data_dir"] = str(data_dir)
    return report
