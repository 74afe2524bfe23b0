"""Time to first token through the pipeline against a direct TGI stream, same run (issue 13).

Starts the local stack (Tansu, embedded Milvus, two dev TGI servers with SmolLM2-135M) and one worker,
then asks the same question set, one request at a time, three ways, interleaved per round:

* ``direct``: ``TGIGenerator.generate_stream`` against a dev backend (the baseline);
* ``stream``: ``EchoClient.stream`` through Kafka (prepare -> serve -> reply chunks);
* ``whole``: ``EchoClient.ask``, the whole reply as before streaming existed.

TTFT = send -> first non-empty text; total = send -> last text / final reply. Medians and p90s.

    PYTHONPATH=. .venv/bin/python -m bench.stream_ttft --rounds 15 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.hostfacts import host_facts, loadavg, metadata
from devstack.localstack import LocalStack, create_topics
from devstack.workers import WorkerProcess
from echolm.client import EchoClient
from infra.protocols import ChatMessage, GenerationParams
from infra.settings import load_settings
from infra.tgi import TGIGenerator
from streams.topology import topic_specs

QUESTIONS = (
    "Count from one to twenty in words.",
    "Explain what a hash map is.",
    "List five fruits and their colours.",
    "How do I reverse a list in Python?",
)


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 1),
        "n": len(ordered),
    }


async def _run(rounds: int, max_tokens: int) -> dict[str, object]:
    load_start = loadavg()
    started_at = time.time()
    data_dir = Path(tempfile.mkdtemp(prefix="ttft-"))
    base = load_settings(
        stack={"data_dir": str(data_dir), "models": "smollm2"},
        worker={"metrics_port": 0, "web_port": 0, "data_dir": str(data_dir / "worker")},
    )
    stack = LocalStack(base, milvus="server", ephemeral=True, data_dir=data_dir)
    await stack.start()
    settings = stack.apply(base)
    await create_topics(settings.kafka.bootstrap_servers, topic_specs(settings))
    worker = WorkerProcess(settings, log_path=data_dir / "worker.log", name="worker-0")
    worker.start()
    times: dict[str, dict[str, list[float]]] = {
        k: {"ttft": [], "total": []} for k in ("direct", "stream", "whole")
    }
    try:
        await worker.wait_ready()
        backend = settings.tgi.backends[0]
        async with TGIGenerator.from_settings(backend, settings.tgi) as tgi, EchoClient(settings) as client:
            for r in range(rounds + 1):  # round 0 warms up every path and is not counted
                for i, question in enumerate(QUESTIONS):
                    tenant = f"bench-{r}-{i}"  # a fresh tenant: no cached examples, same work each way
                    started = time.perf_counter()
                    first = None
                    params = GenerationParams(max_new_tokens=max_tokens)
                    async for piece in tgi.generate_stream([ChatMessage("user", question)], params):
                        if piece.text and first is None:
                            first = time.perf_counter() - started
                    direct = (first or 0.0, time.perf_counter() - started)
                    started, first = time.perf_counter(), None
                    async for delta in client.stream(
                        question, tenant=tenant, max_tokens=max_tokens, timeout=120
                    ):
                        if delta.text and first is None:
                            first = time.perf_counter() - started
                    streamed = (first or 0.0, time.perf_counter() - started)
                    started = time.perf_counter()
                    reply = await client.ask(
                        question, tenant=tenant + "w", max_new_tokens=max_tokens, timeout=120
                    )
                    assert reply.ok, reply
                    whole = time.perf_counter() - started
                    if r == 0:
                        continue
                    for key, (ttft, total) in (
                        ("direct", direct),
                        ("stream", streamed),
                        ("whole", (whole, whole)),
                    ):
                        times[key]["ttft"].append(ttft)
                        times[key]["total"].append(total)
                print(f"round {r} done", file=sys.stderr, flush=True)
    finally:
        await worker.stop(timeout_s=15)
        await stack.stop()
    return {
        **metadata(
            "stream-ttft",
            command=f"python -m bench.stream_ttft --rounds {rounds} --max-tokens {max_tokens}",
            started_at=started_at,
            wall_s=round(time.time() - started_at, 1),
        ),
        "machine": host_facts(loadavg_start=load_start, loadavg_end=loadavg()),
        "rounds": rounds,
        "questions": len(QUESTIONS),
        "max_tokens": max_tokens,
        "results": {k: {m: _summary(v) for m, v in d.items()} for k, d in times.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/stream-ttft.json"))
    args = parser.parse_args()
    result = asyncio.run(_run(args.rounds, args.max_tokens))
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result["results"], option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
