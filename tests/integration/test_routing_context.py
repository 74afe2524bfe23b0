"""The router's context comes from the examples actually chosen, on the real stack.

A bank of five pairs with five different quality estimates is imported; one paraphrase of each is
asked. Every served request's log record holds the bandit context its route used; its
``mean_quality`` must be the mean quality of the examples that record lists, as stored in the bank,
and so must differ between requests. (Before prepare shipped the context, serve rebuilt examples
from their wire form with the default quality 0.5, and the feature was the same for every request.)
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from agents.policy.admission import example_id
from agents.policy.bandit import CONTEXT_NAMES
from echolm.bank import import_bank, read_log
from echolm.client import EchoClient

from .conftest import PipelineFactory

pytestmark = pytest.mark.integration

TENANT = "acme"
# (bank question, its quality estimate, a paraphrase to ask)
BANK = [
    ("How do I reset my password?", 0.1, "How can I reset my password?"),
    ("What is the capital of France?", 0.3, "What's the capital city of France?"),
    ("How do I cancel my subscription?", 0.6, "How can I cancel my subscription?"),
    ("How long does shipping take to Canada?", 0.8, "How long does delivery to Canada take?"),
    ("Do you offer student discounts?", 0.95, "Is there a discount for students?"),
]
MEAN_QUALITY = CONTEXT_NAMES.index("mean_quality")
EXAMPLES = CONTEXT_NAMES.index("examples")


async def test_mean_quality_follows_the_examples_chosen(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    # replay off: it would rewrite the bank's quality estimates while the test reads them
    pipeline = await pipeline_factory(workers=1, replay={"enabled": False})
    settings = pipeline.settings
    rows = tmp_path / "bank.jsonl"
    rows.write_bytes(
        b"".join(
            orjson.dumps({"request": q, "response": f"The answer to: {q}", "quality": quality}) + b"\n"
            for q, quality, _ in BANK
        )
    )
    assert await import_bank(settings, rows, tenant=TENANT, quiet=True) == 0
    quality_of = {example_id(TENANT, q): quality for q, quality, _ in BANK}

    async with EchoClient(settings) as client:
        asked = {}
        for _, _, paraphrase in BANK:
            reply = await client.ask(paraphrase, tenant=TENANT, timeout=120, max_new_tokens=4)
            assert reply.ok, reply
            asked[reply.request_id] = paraphrase

    served = [r for r in await read_log(settings) if r.origin == "serve"]
    assert {r.request.request_id for r in served} == set(asked)
    seen: list[float] = []
    for record in served:
        assert record.route is not None and len(record.route.context) == len(CONTEXT_NAMES)
        chosen = [e.example_id for e in record.examples]
        assert chosen, f"{asked[record.request.request_id]!r} was served without examples"
        assert set(chosen) <= set(quality_of), chosen
        context = record.route.context
        assert context[EXAMPLES] == pytest.approx(len(chosen) / 5.0)
        expected = sum(quality_of[c] for c in chosen) / len(chosen)
        assert context[MEAN_QUALITY] == pytest.approx(expected, abs=1e-3), (
            asked[record.request.request_id],
            chosen,
        )
        seen.append(context[MEAN_QUALITY])
    assert len({round(v, 3) for v in seen}) >= 3, seen
