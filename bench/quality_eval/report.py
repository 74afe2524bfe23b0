"""Tables from the generation cache: cells per condition, pre-registered contrasts, facts, judge.

    python -m bench.quality_eval report                       # print the tables
    python -m bench.quality_eval report --update-benchmarks   # + quality-cells.json, BENCHMARKS.md

Nothing is generated here: every answer is looked up in the cache by the key its prompt would have,
so the tables cover exactly the requests the runs reached. Scoring follows
docs/quality-preregistration.md (metrics, tie margins, contrasts, Holm, parity rule).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.policy.scoring import wilson_interval
from bench.hostfacts import host_facts, metadata
from bench.quality_eval.cache import GenerationCache
from bench.quality_eval.conditions import CONDITIONS
from bench.quality_eval.engine import MODELS, Engine, params_for
from bench.quality_eval.facts import carries_fact
from bench.quality_eval.judge import (
    JUDGE_MAX_TOKENS,
    Verdict,
    agreement,
    combine,
    judge_messages,
    parse_letter,
)
from bench.quality_eval.metrics import (
    CACHE_ANSWER_WORDS,
    METRICS,
    REFERENCE_WORDS,
    Scores,
    cut_words,
    score_pairs,
)
from bench.quality_eval.run import CACHE_DIR, MAX_NEW_TOKENS
from bench.quality_eval.schedule import FACT_CONDITIONS
from bench.quality_eval.stats import FloatArray, holm, outcomes, paired_bootstrap, reweighted_mean
from bench.quality_eval.workspace import Workspace, tier_of

__all__ = ["CELLS_JSON", "CONTRASTS", "MARGINS", "analyse", "main"]

ROOT = Path(__file__).resolve().parents[2]
CELLS_JSON = ROOT / "bench" / "results" / "quality-cells.json"
MARGINS = {"cosine": 0.02, "rouge_l": 0.02, "chrf": 2.0}
PRIMARY = "cosine"
CONTRASTS: dict[str, tuple[str, str]] = {
    "C1": ("small_two_stage", "large"),
    "C2": ("small_two_stage", "small"),
    "C3": ("small_two_stage", "small_topk"),
    "C4": ("small_two_stage", "small_random"),
    "C5": ("small_topk", "small"),
    "C6": ("large_two_stage", "large"),
    "C7": ("semantic_cache", "large"),
}
PARITY_FLOOR = 0.45


# ------------------------------------------------------------------------------------ collecting
def _answers(ws: Workspace, engine: Engine) -> dict[str, dict[int, str]]:
    """condition -> live index -> answer, for every cached generation (semantic cache: where any
    generated condition of that request exists)."""
    params = params_for(MAX_NEW_TOKENS)
    out: dict[str, dict[int, str]] = {c: {} for c in CONDITIONS}
    for i in range(ws.n_live):
        plan = ws.sharegpt_plan(i)
        for condition, messages in plan.messages.items():
            hit = engine.cached(tier_of(condition), messages, params)
            if hit is not None:
                out[condition][i] = hit.text
        if plan.cached_answer is not None and any(i in out[c] for c in plan.messages):
            out["semantic_cache"][i] = cut_words(plan.cached_answer, CACHE_ANSWER_WORDS)
    return out


def _mean_ci(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    boot = v[np.random.default_rng(seed).integers(0, v.size, size=(10_000, v.size))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci_low": float(low), "ci_high": float(high)}


def _paired(
    scores: Mapping[str, Mapping[int, Scores]], a: str, b: str, metric: str
) -> tuple[list[int], list[float], list[float]]:
    both = sorted(set(scores[a]) & set(scores[b]))
    return both, [scores[a][i].get(metric) for i in both], [scores[b][i].get(metric) for i in both]


def _parity(c1: Mapping[str, Any] | None) -> str:
    if c1 is None:
        return "not measured"
    low, high = c1["win_ci"]
    if low >= PARITY_FLOOR:
        return "holds"
    if high < PARITY_FLOOR:
        return "fails"
    return "not shown"


def _facts(ws: Workspace, engine: Engine) -> dict[str, Any]:
    params = params_for(MAX_NEW_TOKENS)
    per: dict[str, list[bool]] = {c: [] for c in FACT_CONDITIONS}
    leaks = 0
    shown = dict.fromkeys(("small_two_stage", "large_two_stage"), 0)
    for j, q in enumerate(ws.questions):
        plan = ws.fact_plan(j)
        for condition in FACT_CONDITIONS:
            leaks += sum(1 for _, tenant in plan.examples.get(condition, []) if tenant != q.fact.tenant)
            if condition in shown and plan.examples.get(condition):
                shown[condition] += 1
            hit = engine.cached(tier_of(condition), plan.messages[condition], params)
            if hit is not None:
                per[condition].append(carries_fact(hit.text, q.fact.fact_token))
    cells = {}
    for condition, carried in per.items():
        n = len(carried)
        low, high = wilson_interval(sum(carried), n) if n else (float("nan"), float("nan"))
        cells[condition] = {
            "n": n,
            "carried": sum(carried),
            "rate": sum(carried) / n if n else float("nan"),
            "ci_low": low,
            "ci_high": high,
        }
    return {
        "questions": len(ws.questions),
        "cells": cells,
        "other_tenant_examples": leaks,
        "questions_with_examples": shown,
    }


def _judge(ws: Workspace, engine: Engine, scores: Mapping[str, Mapping[int, Scores]]) -> dict[str, Any]:
    params, jparams = params_for(MAX_NEW_TOKENS), params_for(JUDGE_MAX_TOKENS)
    judge_v: list[Verdict] = []
    metric_v: list[Verdict] = []
    why_tie = {"same_position": 0, "said_tie": 0, "unreadable": 0}
    for i in sorted(set(scores["small_two_stage"]) & set(scores["large"])):
        plan = ws.sharegpt_plan(i)
        a = engine.cached("small", plan.messages["small_two_stage"], params)
        b = engine.cached("large", plan.messages["large"], params)
        if a is None or b is None:
            continue
        ab = engine.cached("large", judge_messages(ws.prompt(i), a.text, b.text), jparams)
        ba = engine.cached("large", judge_messages(ws.prompt(i), b.text, a.text), jparams)
        if ab is None or ba is None:
            continue
        judge_v.append(combine(ab.text, ba.text))
        if judge_v[-1] == "tie":
            letters = (parse_letter(ab.text), parse_letter(ba.text))
            why_tie[
                "unreadable" if "?" in letters else "said_tie" if "T" in letters else "same_position"
            ] += 1
        o = outcomes(
            [scores["small_two_stage"][i].cosine], [scores["large"][i].cosine], margin=MARGINS[PRIMARY]
        )[0]
        metric_v.append("first" if o == 1.0 else "second" if o == 0.0 else "tie")
    n = len(judge_v)
    win = (judge_v.count("first") + 0.5 * judge_v.count("tie")) / n if n else float("nan")
    return {
        "n": n,
        "win_rate_small_two_stage": win,
        "verdicts": {v: judge_v.count(v) for v in ("first", "second", "tie")},
        "agreement_with_cosine": agreement(judge_v, metric_v),
        "ties_because": why_tie,
    }


def _by_bin(
    ws: Workspace, scores: dict[str, dict[int, Scores]]
) -> tuple[dict[str, Any], dict[str, FloatArray]]:
    """Per similarity bin: requests, how many two-stage showed examples for, and C1's win rate."""
    bins: dict[str, Any] = {}
    for i in scores["large"]:
        label = ws.corpus.manifest.live[i]["bin"]
        b = bins.setdefault(label, {"n_large": 0, "two_stage_with_examples": 0, "pairs": []})
        b["n_large"] += 1
        if ws.sharegpt_plan(i).examples["small_two_stage"]:
            b["two_stage_with_examples"] += 1
        if i in scores["small_two_stage"]:
            b["pairs"].append((scores["small_two_stage"][i].cosine, scores["large"][i].cosine))
    by_bin: dict[str, Any] = {}
    per_bin: dict[str, FloatArray] = {}
    for label, b in sorted(bins.items()):
        pairs = b.pop("pairs")
        per_bin[label] = outcomes([p[0] for p in pairs], [p[1] for p in pairs], margin=MARGINS[PRIMARY])
        win = float(per_bin[label].mean()) if pairs else float("nan")
        by_bin[label] = {**b, "c1_n": len(pairs), "c1_win_rate": win}
    return by_bin, per_bin


def _natural_mix(ws: Workspace, per_bin: Mapping[str, FloatArray]) -> dict[str, Any] | None:
    """C1's win rate carried from the bin-stratified sample back to the live pool's own bin mix
    (exploratory: the sample takes up to 200 per bin, so near neighbours are over-represented)."""
    pool = {k: float(v) for k, v in ws.corpus.manifest.meta.get("live_candidates_by_bin", {}).items()}
    if not any(len(v) and pool.get(k, 0.0) > 0 for k, v in per_bin.items()):
        return None
    est, ci = reweighted_mean(per_bin, pool)
    return {"pool_by_bin": pool, "c1_win_rate": est, "c1_win_ci": list(ci)}


def _timing(cache: GenerationCache) -> dict[str, Any]:
    """Median generation, decode and prefill speeds per tier, from the cache's timings."""
    timing: dict[str, Any] = {}
    for tier in ("small", "large"):
        gens = [r for r in cache.rows.values() if r.model == MODELS[tier].sha256 and r.completion_tokens > 2]
        if gens:
            decode = [
                r.completion_tokens / max(1e-9, r.total_s - r.ttft_s) for r in gens if r.total_s > r.ttft_s
            ]
            prefill = [r.prompt_tokens / r.ttft_s for r in gens if r.ttft_s > 0]
            timing[tier] = {
                "generations": len(gens),
                "median_total_s": float(np.median([r.total_s for r in gens])),
                "median_decode_tok_s": float(np.median(decode)) if decode else float("nan"),
                "median_prefill_tok_s": float(np.median(prefill)) if prefill else float("nan"),
            }
    return timing


# ------------------------------------------------------------------------------------- analysing
def score_all(ws: Workspace, engine: Engine) -> dict[str, dict[int, Scores]]:
    """condition -> live index -> the answer's scores against the reference, for every cached answer."""
    answers = _answers(ws, engine)
    flat = [(c, i, text) for c, rows in answers.items() for i, text in rows.items()]
    scored = score_pairs([t for _, _, t in flat], [ws.reference(i) for _, i, _ in flat])
    scores: dict[str, dict[int, Scores]] = {c: {} for c in CONDITIONS}
    for (c, i, _), s in zip(flat, scored, strict=True):
        scores[c][i] = s
    return scores


def analyse(ws: Workspace, cache: GenerationCache) -> dict[str, Any]:
    engine = Engine(cache)
    scores = score_all(ws, engine)

    cells: dict[str, Any] = {}
    for c in CONDITIONS:
        rows = scores[c]
        cell: dict[str, Any] = {"n": len(rows)}
        for m in METRICS:
            cell[m] = _mean_ci([s.get(m) for s in rows.values()])
        if c != "large":
            both, a, b = _paired(scores, c, "large", PRIMARY)
            cell["vs_large"] = paired_bootstrap(a, b, margin=MARGINS[PRIMARY]).as_dict() if both else None
        cells[c] = cell

    contrasts: dict[str, Any] = {}
    for cid, (a_name, b_name) in CONTRASTS.items():
        both, a, b = _paired(scores, a_name, b_name, PRIMARY)
        if not both:
            continue
        row = {"a": a_name, "b": b_name, **paired_bootstrap(a, b, margin=MARGINS[PRIMARY]).as_dict()}
        for m in METRICS[1:]:
            _, am, bm = _paired(scores, a_name, b_name, m)
            row[f"{m}_win_rate"] = float(outcomes(am, bm, margin=MARGINS[m]).mean())
        contrasts[cid] = row
    adjusted = holm({cid: row["p_sign"] for cid, row in contrasts.items()})
    for cid, p in adjusted.items():
        contrasts[cid]["p_holm"] = p

    by_bin, per_bin = _by_bin(ws, scores)

    timing = _timing(cache)
    c1 = contrasts.get("C1")
    topk_random = _paired(scores, "small_topk", "small_random", PRIMARY)
    ordering = {
        "two_stage_minus_topk": contrasts["C3"]["diff"] if "C3" in contrasts else None,
        "topk_minus_random": float(np.mean(np.subtract(topk_random[1], topk_random[2])))
        if topk_random[0]
        else None,
    }
    ordering["holds"] = all(v is not None and v >= 0 for v in ordering.values())
    return {
        "schema": "echolm.quality-cells.v1",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {tier: {"name": m.name, "sha256": m.sha256} for tier, m in MODELS.items()},
        "generation": params_for(MAX_NEW_TOKENS) | {"n_threads": 2},
        "data": {
            "source": ws.corpus.manifest.meta["source"],
            "live_listed": ws.n_live,
            "bank": len(ws.corpus.bank),
            "reference_words": REFERENCE_WORDS,
            "cache_answer_words": CACHE_ANSWER_WORDS,
        },
        "primary_metric": PRIMARY,
        "tie_margins": MARGINS,
        "cells": cells,
        "contrasts": contrasts,
        "parity": {"rule": f"C1 win-rate 95% lower bound >= {PARITY_FLOOR}", "verdict": _parity(c1)},
        "selector_ordering": ordering,
        "by_bin": by_bin,
        "natural_mix": _natural_mix(ws, per_bin),
        "facts": _facts(ws, engine),
        "judge": _judge(ws, engine, scores),
        "timing": timing,
        "generations_cached": len(cache),
    }


def main(update: bool = False) -> int:
    from bench.quality_eval.report_md import markdown, update_benchmarks

    started = time.time()
    ws = Workspace.load()
    analysed = analyse(ws, GenerationCache(CACHE_DIR))
    result = {
        **metadata(
            "quality", command="echolm bench quality", started_at=started, wall_s=time.time() - started
        ),
        "machine": host_facts(),
        **analysed,
    }
    print(markdown(result))
    if update:
        CELLS_JSON.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n", encoding="utf-8")
        update_benchmarks(result)
    return 0
