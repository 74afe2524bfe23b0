"""Exception safety through a real worker (agents/guard.py): a handler that raises at any stage is
answered (where a reply address is known) and dead-lettered with its coordinates and stage, and the
worker goes on serving.

The faults are injected with ``worker.fault_stages``: a request id ``fault-<stage>-...`` raises
``InjectedFault`` when the handler marks that stage. Real Tansu broker, embedded Milvus, an
``echolm worker`` subprocess and two emulated dev TGI servers the test owns.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agents.guard import STAGES, fault_id
from devstack.localstack import LocalStack
from echolm.client import EchoClient

from .fleet import (
    OwnedBackend,
    backends_section,
    collect_replies,
    crash_report,
    make_pipeline,
    owned_backends,
    per_id,
    read_topic,
    start_workers,
)

pytestmark = pytest.mark.integration

# the stages a request passes before its reply: a fault there gets an error reply and a dead letter
REPLY_STAGES = ("parse", "embed", "retrieve", "select", "route", "generate", "emit")


async def _dead_letters(settings: Any, wanted: int, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        letters = await read_topic(settings, settings.topic("deadletter"))
        if len(letters) >= wanted or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(1.0)


async def test_a_fault_at_every_stage_is_answered_or_dead_lettered_and_the_worker_goes_on(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    backends = [
        OwnedBackend("emu-small", "small", cost=1.0, quality_prior=0.45),
        OwnedBackend("emu-large", "large", cost=10.0, quality_prior=0.8),
    ]
    tag = uuid.uuid4().hex[:6]
    async with owned_backends(backends, tmp_path):
        pipeline = await make_pipeline(
            local_stack,
            tmp_path,
            tgi=backends_section(backends),
            # serve's stages read the prepared topic, whose coordinates the dead letters carry
            worker={"fault_stages": [s for s in STAGES if s != "replay"], "prepared_hop": "kafka"},
        )
        try:
            (worker,) = await start_workers(pipeline, 1)
            settings = pipeline.settings
            async with EchoClient(settings) as client:
                faulty: dict[str, str] = {}
                plain: list[str] = []
                # interleaved, so batches of prepare and admit hold faulty and plain records together
                for i, stage in enumerate((*REPLY_STAGES, "admit", "learn")):
                    faulty[stage] = await client.send(
                        f"Fault {i} at {stage}: say ok.",
                        tenant="acme",
                        request_id=fault_id(stage, tag),
                        max_new_tokens=4,
                    )
                    plain.append(await client.send(f"Plain {i}: say ok.", tenant="acme", max_new_tokens=4))
                expected = set(faulty.values()) | set(plain)
                got = await collect_replies(client, expected, timeout_s=120)
                assert set(got) == expected, (
                    f"unanswered: {sorted(expected - set(got))}; {crash_report(pipeline.workers)}"
                )
                await client.feedback(faulty["learn"], 1.0, tenant="acme")
                letters = await _dead_letters(settings, len(faulty), timeout_s=60)
                after = await client.ask(
                    "After the faults: say ok.", tenant="acme", timeout=60, max_new_tokens=4
                )
        finally:
            await pipeline.stop()

    # every input was answered or dead-lettered, and the worker kept serving
    for stage in REPLY_STAGES:
        reply = got[faulty[stage]]
        assert not reply.ok and reply.error_code == "internal", (stage, reply)
    for rid in (*plain, faulty["admit"], faulty["learn"]):
        assert got[rid].ok, got[rid]  # admit and learn fail after the reply
    assert after.ok, after
    assert worker.log_path.read_text(errors="replace").count("Crashed reason") == 0

    by_id = {letter["request_id"]: letter for letter in letters}
    assert per_id(letters) == {faulty[s]: 1 for s in REPLY_STAGES} | {faulty["admit"]: 1, faulty["learn"]: 1}
    source = {s: "requests" for s in ("parse", "embed", "retrieve", "select")}
    source |= {s: "prepared" for s in ("route", "generate", "emit")} | {"admit": "log", "learn": "feedback"}
    for stage, rid in faulty.items():
        letter = by_id[rid]
        assert letter["stage"] == stage and "InjectedFault" in letter["reason"], letter
        assert letter["source_topic"] == settings.topic(source[stage]), letter
        assert letter["partition"] >= 0 and letter["offset"] >= 0, letter
    print(
        f"\nguard: {len(faulty)} faults ({', '.join(faulty)}), {len(plain)} plain requests: "
        f"{sum(not got[faulty[s]].ok for s in REPLY_STAGES)} error replies, {len(letters)} dead letters, "
        f"{sum(got[r].ok for r in plain)} plain answered; a request after them: ok={after.ok}"
    )
