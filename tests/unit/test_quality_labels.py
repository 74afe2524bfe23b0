"""Utility-label rows from measured generations, and the facts end-to-end summary (pure parts)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bench.facts_e2e import _leaks, questions, summarise
from bench.quality_eval.facts import Fact
from bench.quality_eval.labels import label_rows
from bench.utility_labels import example_labels


def test_label_rows_need_both_scores_and_shown_examples() -> None:
    alone = {0: 0.5, 1: 0.6, 2: 0.7}
    with_examples = {"small_two_stage": {0: 0.8, 1: 0.55, 3: 0.9}, "small_topk": {2: 0.71}}
    shown: dict[str, dict[int, list[list[float]]]] = {
        "small_two_stage": {0: [[1.0, 2.0]], 1: [[0.1, 0.2], [0.3, 0.4]], 3: [[9.0, 9.0]]},
        "small_topk": {2: []},  # nothing shown: no row
    }
    rows = label_rows(alone, with_examples, shown)
    assert [(r["live"], r["condition"]) for r in rows] == [(0, "small_two_stage"), (1, "small_two_stage")]
    assert rows[0]["score_alone"] == 0.5 and rows[0]["score_with"] == 0.8
    assert rows[1]["features"] == [[0.1, 0.2], [0.3, 0.4]]


def test_labels_follow_measured_helpfulness_not_similarity() -> None:
    """A near-duplicate example that lowered the score is labelled 0; a far one that raised it, 1."""
    from agents.policy.features import FEATURE_NAMES

    near, far = [0.99] * len(FEATURE_NAMES), [0.2] * len(FEATURE_NAMES)
    rows = label_rows(
        {0: 0.7, 1: 0.4},
        {"small_two_stage": {0: 0.6, 1: 0.6}},
        {"small_two_stage": {0: [near], 1: [far]}},
    )
    labelled = example_labels(rows)
    assert labelled.y.tolist() == [0.0, 1.0]


def _fact(tenant: str, n: int) -> Fact:
    return Fact(f"{tenant}-{n}", tenant, "q?", "a.", ("p1?", "p2?", "p3?"), f"ZX-{n}")


def test_questions_take_the_first_paraphrases_of_each_fact() -> None:
    asks = questions([_fact("a", 1), _fact("a", 2)], 2)
    assert [(f.fact_id, q) for f, q in asks] == [
        ("a-1", "p1?"),
        ("a-1", "p2?"),
        ("a-2", "p1?"),
        ("a-2", "p2?"),
    ]


def _row(rid: str, tenant: str, carried: bool, tier: str = "small", n_examples: int = 1) -> dict[str, Any]:
    return {
        "request_id": rid,
        "tenant": tenant,
        "carried": carried,
        "ok": True,
        "tier": tier,
        "n_examples": n_examples,
        "latency_s": 1.0,
    }


def test_leaks_are_counted_from_the_examples_tenants() -> None:
    rows = [_row("r1", "a", True), _row("r2", "b", True)]
    log = [
        SimpleNamespace(request=SimpleNamespace(request_id="r1"), examples=[SimpleNamespace(tenant="a")]),
        SimpleNamespace(
            request=SimpleNamespace(request_id="r2"),
            examples=[SimpleNamespace(tenant="b"), SimpleNamespace(tenant="a")],
        ),
        SimpleNamespace(request=SimpleNamespace(request_id="other"), examples=[SimpleNamespace(tenant="z")]),
    ]
    total, foreign, shown = _leaks(rows, log)
    assert (total, foreign) == (3, 1)
    assert shown["r2"] == ["b", "a"]


@pytest.mark.parametrize(("carried", "foreign", "met"), [(9, 0, True), (8, 0, False), (10, 1, False)])
def test_criterion_needs_ninety_percent_and_no_leak(carried: int, foreign: int, met: bool) -> None:
    rows = [_row(str(i), "a", i < carried) for i in range(10)]
    s = summarise(rows, examples_total=10, foreign=foreign)
    assert s["met"] is met
    assert s["carried"] == carried
    assert s["ci95"][0] < carried / 10 <= s["ci95"][1]
