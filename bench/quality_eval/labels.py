"""Utility-model training rows from the measured generations (issue 8, item 5).

    python -m bench.quality_eval labels [--out bench/results/quality/utility-labels.jsonl]
    python -m bench.utility_labels bench/results/quality/utility-labels.jsonl --out .echolm/utility-model.json

For every live request where the small model answered alone *and* with examples (two-stage, top-k
or random), one row: both answers' scores against the reference (the report's primary metric, MiniLM
cosine) and the stage-2 features of each example that condition showed, computed exactly as the
serving selector computes them (``agents.policy.features.candidate_features``, ``target_tier="small"``).
``bench.utility_labels`` turns a row into per-example labels: 1 when the examples raised the score
by more than the tie margin. The label is measured helpfulness, not "the candidate is a rewording".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agents.policy.features import candidate_features
from bench.quality_eval.conditions import Candidate

__all__ = ["EXAMPLE_CONDITIONS", "label_rows", "write_label_rows"]

EXAMPLE_CONDITIONS = ("small_two_stage", "small_topk", "small_random")


def label_rows(
    alone: Mapping[int, float],
    with_examples: Mapping[str, Mapping[int, float]],
    shown: Mapping[str, Mapping[int, Sequence[list[float]]]],
) -> list[dict[str, Any]]:
    """Rows for ``bench.utility_labels``: ``alone[i]`` is the small model's score without examples,
    ``with_examples[c][i]`` with condition ``c``'s examples, ``shown[c][i]`` their feature vectors.
    A request needs both scores and at least one shown example. Pure."""
    rows: list[dict[str, Any]] = []
    for condition in EXAMPLE_CONDITIONS:
        scores = with_examples.get(condition, {})
        for i in sorted(scores):
            features = list(shown.get(condition, {}).get(i, ()))
            if i not in alone or not features:
                continue
            rows.append(
                {
                    "live": i,
                    "condition": condition,
                    "score_alone": round(float(alone[i]), 6),
                    "score_with": round(float(scores[i]), 6),
                    "features": [[round(float(x), 6) for x in f] for f in features],
                }
            )
    return rows


def _features(ws: Any, i: int, condition: str) -> list[list[float]]:
    """The shown examples' features for live request ``i`` under ``condition``."""
    recall, pool = ws.sharegpt_candidates(i)
    by_id: dict[str, Candidate] = {c.example_id: c for c in (*pool, *recall)}
    vector, prompt = ws.corpus.live_vectors[i], ws.prompt(i)
    return [
        candidate_features(vector, prompt, by_id[eid].hit(), target_tier="small", now=0.0).tolist()
        for eid, _tenant in ws.sharegpt_plan(i).examples.get(condition, [])
    ]


def write_label_rows(out: Path, ws: Any, scores: Mapping[str, Mapping[int, Any]]) -> int:
    """Write the rows of ``scores`` (condition -> live index -> ``Scores``) to ``out``; their count."""
    alone = {i: s.cosine for i, s in scores.get("small", {}).items()}
    with_examples = {c: {i: s.cosine for i, s in scores.get(c, {}).items()} for c in EXAMPLE_CONDITIONS}
    shown = {c: {i: _features(ws, i, c) for i in with_examples[c] if i in alone} for c in EXAMPLE_CONDITIONS}
    rows = label_rows(alone, with_examples, shown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)
