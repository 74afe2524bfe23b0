"""What every system decides per request of the sweep's stream, computed once with the real components.

    python -m bench.fleet.decisions --out bench/results/fleet-decisions.json.gz

For each distinct request text of the stream (``bench.fleet.sweep``'s workload, ``--requests`` long):
MiniLM embeds it (the worker's ``SentenceTransformerEmbedder``); its ``selection.top_k`` nearest bank
rows by cosine become ``SearchHit``s (exact search over the same bank the real-time sweep seeds into
Milvus; Milvus's HNSW returns the same rows up to its recall); then echolm's own decision code runs
as the worker runs it: ``DecisionState.create`` (the router's bandit with the measured priors, the
utility model trained offline by ``train_utility`` exactly as the real-time sweep trains it),
``select_examples`` (target tier small, the state's token budget), ``context_features`` and
``route_estimates``. Stored per text: the nearest bank row's cosine and group (the semantic cache and
the quality router decide from these), the selected examples' count, tokens and groups, and per
tier the estimate (mean, width) and whether that tier is shown the examples. What is left to decide
at serving time, the load term and the replica, ``choose_backend`` decides in the virtual fleet
(``bench.fleet.vsweep``) on the live queue depths.

The bank is fixed while the sweep runs (no admission), the same for every system: with a stream of
tens of thousands of requests drawn from a few hundred texts, admitting served requests would turn
every system into an exact-repeat cache. The real-time sweep admits; this is the steady state of a
bank warm-started from logs.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet.preset import LARGE, SMALL, TENANT
from bench.fleet.sweep import SWEEP_SYSTEMS, SweepPreset, tier_services
from bench.replay_trace import SYSTEM_TOKENS, turn_tokens

__all__ = ["build_decisions"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


async def build_decisions(sp: SweepPreset, n_requests: int, data_dir: Path) -> dict[str, Any]:
    from agents.policy.retrieval import select_examples
    from agents.policy.routing import context_features, route_estimates
    from agents.state import DecisionState
    from bench.fleet.echolm_path import bank_examples
    from bench.fleet.replicas import system_backends, system_settings
    from bench.fleet.training import train_utility
    from bench.fleet.workbench import build_workbench
    from bench.quality_cells import QualityCells
    from infra.embedding import SentenceTransformerEmbedder
    from infra.protocols import SearchHit
    from infra.settings import EmbeddingSettings

    preset = replace(sp.fleet(SWEEP_SYSTEMS), burst_requests=n_requests)
    bench = build_workbench(preset)
    stream = bench.phases["burst"]
    texts = sorted({s.text for s in stream})
    group_of_text = {s.text: s.group_id for s in stream}
    utility_path = data_dir / "utility-model.json"
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once
    async with SentenceTransformerEmbedder(EmbeddingSettings(threads=2)) as embedder:
        bank_vectors = np.asarray(await embedder.embed([t for t, _ in bench.bank]), dtype=np.float32)
        vectors = np.asarray(await embedder.embed(texts), dtype=np.float32)
        training = await train_utility(preset, embedder, bench.groups, utility_path)
    services = tier_services()
    quality = QualityCells.load().as_quality_model()
    backends = system_backends(preset, "echolm", services[preset.small_model], services[preset.large_model])
    settings = system_settings(preset, backends, quality, data_dir=data_dir, utility_model_path=utility_path)
    state = DecisionState.create(settings)
    sel = settings.selection
    now = time.time()
    examples = bank_examples(bench.bank, bank_vectors, preset.tokens_median, now)
    rows: dict[str, Any] = {}
    for i, text in enumerate(texts):
        sims = bank_vectors @ vectors[i]
        top = np.argsort(-sims)[: sel.top_k]
        hits = [SearchHit(examples[j], float(sims[j])) for j in top]
        selected = select_examples(
            vectors[i], text, hits, scorer=state.utility, threshold=state.tuner.threshold,
            max_examples=sel.max_examples, min_similarity=sel.min_similarity,
            duplicate_similarity=sel.duplicate_similarity, diversity=sel.diversity,
            token_budget=state.token_budget, target_tier=SMALL, now=now, large_tier=LARGE, tenant=TENANT,
        ).selected  # fmt: skip
        context = context_features(vectors[i], list(selected), prompt_text=text)
        estimates, shown = route_estimates(state.bandit, context, margin=settings.routing.examples_margin)
        chosen = [s.example for s in selected]
        chosen_ids = {e.example_id for e in chosen}
        rows[text] = {
            "group": group_of_text[text],
            "tokens": SYSTEM_TOKENS + turn_tokens(text),
            "nearest": float(sims[top[0]]),
            "nearest_group": bench.bank[int(top[0])][1],
            "n_examples": len(chosen),
            "example_tokens": sum(turn_tokens(e.request) + turn_tokens(e.response) for e in chosen),
            "example_groups": [bench.bank[int(j)][1] for j in top if examples[j].example_id in chosen_ids],
            "estimates": {t: [e.mean, e.width] for t, e in estimates.items()},
            "shown": {t: bool(v) for t, v in shown.items()},
        }
    return {
        "what": "bench.fleet.decisions: per distinct request text, what each system's decision reads",
        "sweep": {"seed": sp.seed, "requests": n_requests, "small": sp.small, "large": sp.large},
        "bank_rows": len(bench.bank),
        "texts": len(texts),
        "utility_training": training,
        "threshold": state.tuner.threshold,
        "routing": settings.routing.model_dump(mode="json"),
        "backends": [b.model_dump(mode="json") for b in settings.tgi.backends],
        "stale_after_s": settings.tgi.stale_after_s,
        "probe_interval_s": settings.tgi.probe_interval_s,
        "retries": settings.tgi.retries,
        "circuit_failures": settings.tgi.circuit_failures,
        "circuit_reset_s": settings.tgi.circuit_reset_s,
        "semantic_threshold": preset.semantic_threshold,
        "stream": [[s.text, s.max_new_tokens] for s in stream],
        "decisions": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40_000, help="length of the request stream")
    parser.add_argument("--seed", type=int, default=0, help="the workload's seed (groups, texts, lengths)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet-decisions.json.gz")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/echolm-decisions"))
    args = parser.parse_args(argv)
    began = time.time()
    result = asyncio.run(build_decisions(SweepPreset(seed=args.seed), args.requests, args.data_dir))
    result["wall_s"] = time.time() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(gzip.compress(json.dumps(result).encode()))
    d = result["decisions"].values()
    with_examples = sum(1 for r in d if r["n_examples"])
    print(
        f"{result['texts']} texts ({args.requests} requests), bank {result['bank_rows']} rows; "
        f"{with_examples} texts get examples; {result['wall_s']:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
