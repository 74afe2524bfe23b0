"""What an operator touches: Prometheus metrics, warm-start import and export, the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from devstack.localstack import free_port
from echolm.bank import export_bank, import_bank
from echolm.client import EchoClient
from echolm.up import DEMO_QUESTIONS
from infra.settings import child_env, load_settings

from .conftest import PipelineFactory

pytestmark = pytest.mark.integration


async def test_metrics_cover_every_stage(pipeline_factory: PipelineFactory) -> None:
    port = free_port()
    pipeline = await pipeline_factory(workers=0)
    await pipeline.add_worker(metrics_port=port)
    async with EchoClient(pipeline.settings) as client:
        reply = await client.ask(
            "What is a good name for a cat?", tenant="acme", timeout=120, max_new_tokens=4
        )
    assert reply.ok
    await asyncio.sleep(1.5)  # one gauge tick
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    # the default in-process hop: the wait for a serve slot (``handoff``) instead of ``kafka_hop``
    for stage in ("parse", "embed", "retrieve", "select", "handoff", "route", "generate", "emit", "total"):
        assert f'echolm_stage_seconds_count{{stage="{stage}"}} 1.0' in text, stage
    assert 'echolm_stage_seconds_count{stage="kafka_hop"}' not in text  # nothing crossed the topic
    for name in (
        'echolm_requests_total{outcome="ok"} 1.0',
        "echolm_offload_ratio",
        "echolm_cache_lookups_total 1.0",
        'echolm_backend_queue_depth{backend="large-0",kind="waiting"}',
        'echolm_backend_circuit_open{backend="small-0"} 0.0',
        "echolm_router_load_bias",
        "echolm_cache_examples",
    ):
        assert name in text, name


async def test_bank_import_export_round_trip(pipeline_factory: PipelineFactory, tmp_path: Path) -> None:
    pipeline = await pipeline_factory(workers=0)  # no worker needed: import writes Milvus and the log
    settings = pipeline.settings
    pairs = [
        {"request": f"How do I configure feature {i}?", "response": f"Open settings and enable feature {i}."}
        for i in range(40)
    ]
    pairs.append({"request": "Email me at jane.doe@example.com", "response": "Sure, call 555-123-4567."})
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in pairs))
    assert await import_bank(settings, source, tenant="acme", quiet=True) == 0
    out = tmp_path / "export.jsonl"
    assert await export_bank(settings, str(out), tenant="acme", quiet=True) == 0
    exported = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(exported) == len(pairs)
    assert {e["response"] for e in exported} >= {p["response"] for p in pairs[:40]}
    scrubbed = next(e for e in exported if "Email me" in e["request"])
    assert "jane.doe@example.com" not in scrubbed["request"] and "555-123-4567" not in scrubbed["response"]
    # another tenant's export is empty: the import was scoped to acme
    other = tmp_path / "other.jsonl"
    assert await export_bank(settings, str(other), tenant="globex", quiet=True) == 0
    assert other.read_bytes() == b""


async def test_cli_ask_prints_a_reply(pipeline_factory: PipelineFactory) -> None:
    pipeline = await pipeline_factory(workers=1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "echolm.cli",
        "ask",
        "Name a planet.",
        "--tenant",
        "acme",
        "--max-new-tokens",
        "4",
        "--json",
        env=child_env(pipeline.settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    reply = orjson.loads(stdout)
    assert reply["ok"] is True and reply["tenant"] == "acme" and reply["backend"]


async def test_cli_help_on_every_command() -> None:
    commands = ["up", "worker", "ask", "send", "feedback", "topics", "bank", "rebuild-cache", "config"]
    for command in commands:
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "echolm.cli", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0 and "usage: echolm" in out.stdout, (command, out.stderr[-500:])


async def test_echolm_up_demo_serves_paraphrases_from_the_cache(tmp_path: Path) -> None:
    """The README's first command, end to end: its own broker, Milvus, two SmolLM2 dev servers and a
    worker; every demo question answered; a paraphrase served by the small tier with the cached pair
    as an example; the other tenant's identical question gets no example (never another tenant's)."""
    # this environment without any ECHOLM_ variable, then the ports of a stack of the test's own
    env = {k: v for k, v in child_env(load_settings()).items() if not k.startswith("ECHOLM_")}
    ports = [free_port() for _ in range(4)]
    env |= {
        "ECHOLM_STACK__DATA_DIR": str(tmp_path / "stack"),
        "ECHOLM_STACK__BROKER_PORT": str(ports[0]),
        "ECHOLM_STACK__MILVUS_PORT": str(ports[1]),
        "ECHOLM_STACK__BACKEND_PORTS": orjson.dumps(ports[2:]).decode(),
        "ECHOLM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{ports[0]}",
        "ECHOLM_MILVUS__URI": f"http://127.0.0.1:{ports[1]}",
        "ECHOLM_WORKER__METRICS_PORT": str(free_port()),
        "ECHOLM_GATEWAY__PORT": str(free_port()),
        "ECHOLM_WORKER__WEB_PORT": "0",
        "ECHOLM_WORKER__DATA_DIR": str(tmp_path / "worker"),
        "ECHOLM_STACK__MODELS": "smollm2",  # the fast model on both tiers (the Qwen pair: bench/)
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "echolm.cli", "up", "--demo", "--exit-after-demo",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 480)
    out = stdout.decode()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    questions = [line for line in out.splitlines() if "] Q: " in line]
    routes = [line for line in out.splitlines() if line.strip().startswith("-> ")]
    assert len(questions) == len(DEMO_QUESTIONS) == len(routes), out[-3000:]
    by_question = dict(zip(questions, routes, strict=True))
    paraphrases = [r for q, r in by_question.items() if "reverse a Python list" in q or "best way" in q]
    # the paraphrases are served from the cache: shown the earlier answer, on whichever tier the
    # shipped (measured) priors pick
    assert paraphrases and all("0 in-context" not in r for r in paraphrases), out[-3000:]
    other = next(route for q, route in by_question.items() if q.startswith("[other-"))
    assert "0 in-context example(s)" in other, other
    # the gateway started with the stack: its URL, a key minted for the run, and a streamed answer
    err = stderr.decode()
    assert "OpenAI-compatible gateway at http://127.0.0.1:" in err and "API key for tenant 'local'" in err
    streamed = next(line for line in out.splitlines() if "streamed piece(s)" in line)
    assert "HTTP 200" in streamed and " 0 streamed" not in streamed, out[-3000:]
