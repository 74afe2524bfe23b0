"""Latency of the dev TGI server (llama.cpp engine) and of the infra/tgi.py adapter; numbers for docs/tgi.md.

    python -m bench.tgi_dev_latency            # about 30 s on 2 cores; prints a Markdown table

Measures, on a freshly started server with the SmolLM2-135M GGUF (greedy decoding, one thread):
start-up to healthy, decode tokens/s, prefill ms/token, time to first token (``/generate_stream``
and chat streaming), ``/generate`` wall time for 32 tokens, ``TGIGenerator.generate`` against a raw
httpx chat call, and the queue probe's scrape cost. Prompts carry a fresh number so llama.cpp's
prefix cache cannot hide the prefill.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx

from bench.stats import percentile
from devstack.tgi_dev import DevServerProcess
from infra.protocols import ChatMessage, GenerationParams
from infra.settings import BackendSettings
from infra.tgi import TGIGenerator, TGIQueueProbe, parse_queue_gauges

_counter = itertools.count()
STORY = "Write a long story about a lighthouse keeper and the sea."  # chat: long answers
OPENING = "Once upon a time, in a small village by the sea, there lived"  # completion: long continuations


__all__ = ["main", "summary"]


def fresh(text: str) -> str:
    return f"Chapter {next(_counter)}. {text}"


async def timed(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def summary(samples: list[float], scale: float = 1000.0) -> str:
    p50, p90 = percentile(samples, 50), percentile(samples, 90, method="nearest")
    return f"{p50 * scale:.1f} (p90 {p90 * scale:.1f})"


async def main() -> None:
    rows: list[tuple[str, str]] = []
    started = time.perf_counter()
    async with DevServerProcess(port=0) as server:
        rows.append(("start-up to /health 200 (s)", f"{time.perf_counter() - started:.2f}"))
        backend = BackendSettings(name="small-0", url=server.url, tier="small")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            await client.post("/generate", json={"inputs": "warm up", "parameters": {"max_new_tokens": 8}})

            # /generate wall time for 32 tokens, and the decode rate (prefill excluded: time per token
            # after the first, from a 1-token request on the same prompt length).
            walls, per_token, generated = [], [], []
            for _ in range(10):
                t0 = time.perf_counter()
                r = await client.post(
                    "/generate", json={"inputs": fresh(OPENING), "parameters": {"max_new_tokens": 32}}
                )
                walls.append(time.perf_counter() - t0)
                one = await client.post(
                    "/generate", json={"inputs": fresh(OPENING), "parameters": {"max_new_tokens": 1}}
                )
                tokens = int(r.headers["x-generated-tokens"])
                generated.append(tokens)
                decode_ms = int(r.headers["x-inference-time"]) - int(one.headers["x-inference-time"])
                per_token.append(decode_ms / max(tokens - 1, 1))
            rows.append(
                (
                    f"`/generate` 32 tokens, {r.headers['x-prompt-tokens']}-token prompt, wall (ms)",
                    summary(walls),
                )
            )
            rows.append(("  tokens actually generated (median)", f"{statistics.median(generated):.0f}"))
            rows.append(("decode rate (tokens/s)", f"{1000 / statistics.median(per_token):.0f}"))

            # Prefill: a ~1000-token prompt, one new token.
            long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 110)
            prefill = []
            for _ in range(3):
                r = await client.post(
                    "/generate", json={"inputs": fresh(long_prompt), "parameters": {"max_new_tokens": 1}}
                )
                prefill.append(int(r.headers["x-inference-time"]) / int(r.headers["x-prompt-tokens"]))
            rows.append(
                (
                    f"prefill, {r.headers['x-prompt-tokens']}-token prompt (ms/token)",
                    f"{statistics.median(prefill):.2f}",
                )
            )

            # Time to first token.
            async def first_event(path: str, body: dict[str, object]) -> None:
                async with client.stream("POST", path, json=body) as response:
                    async for _ in response.aiter_lines():
                        break

            ttft = await timed(
                10,
                lambda: first_event(
                    "/generate_stream", {"inputs": fresh(OPENING), "parameters": {"max_new_tokens": 32}}
                ),
            )
            rows.append(("time to first token, `/generate_stream`, same prompt (ms)", summary(ttft)))
            chat_ttft = await timed(
                10,
                lambda: first_event(
                    "/v1/chat/completions",
                    {
                        "messages": [{"role": "user", "content": fresh(STORY)}],
                        "max_tokens": 32,
                        "stream": True,
                    },
                ),
            )
            rows.append(
                ("time to first token, chat stream (template adds ~30 tokens) (ms)", summary(chat_ttft))
            )

            # The adapter against a raw httpx call of the same chat completion (32 tokens, greedy).
            params = GenerationParams(max_new_tokens=32)
            async with TGIGenerator(backend) as generator:
                await generator.generate([ChatMessage("user", "warm up")], params)
                adapter = await timed(
                    10, lambda: generator.generate([ChatMessage("user", fresh(STORY))], params)
                )

            async def raw_chat() -> None:
                body = {
                    "messages": [{"role": "user", "content": fresh(STORY)}],
                    "max_tokens": 32,
                    "temperature": 0,
                }
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()

            raw = await timed(10, raw_chat)
            rows.append(("`TGIGenerator.generate`, 32 tokens (ms)", summary(adapter)))
            rows.append(("raw httpx chat completion, 32 tokens (ms)", summary(raw)))

            # The probe: one scrape of one idle backend, and parsing the page.
            page = (await client.get("/metrics")).text
            async with TGIQueueProbe([backend]) as probe:
                scrapes = await timed(200, probe.refresh)
            rows.append(("`TGIQueueProbe.refresh()`, 1 backend (ms)", summary(scrapes)))
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                parse_queue_gauges(page)
            rows.append(
                (
                    f"`parse_queue_gauges`, {len(page.splitlines())}-line page (µs)",
                    f"{(time.perf_counter() - t0) / n * 1e6:.0f}",
                )
            )

    print("| measure | median (p90) |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    asyncio.run(main())
