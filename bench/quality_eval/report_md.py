"""Markdown for the measured-quality result: the BENCHMARKS.md section, written from the numbers only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SECTION", "markdown", "update_benchmarks"]

ROOT = Path(__file__).resolve().parents[2]
SECTION = "measured-quality"
LABELS = {
    "small": "small alone",
    "small_two_stage": "small + two-stage examples",
    "small_topk": "small + top-2 by similarity",
    "small_random": "small + 2 random examples",
    "semantic_cache": "semantic cache (neighbour's stored answer)",
    "large": "large alone",
    "large_two_stage": "large + two-stage examples",
}


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _ci(cell: Mapping[str, Any], spec: str = ".3f") -> str:
    return f"{_f(cell['mean'], spec)} [{_f(cell['ci_low'], spec)}, {_f(cell['ci_high'], spec)}]"


def _cells_table(r: Mapping[str, Any]) -> list[str]:
    lines = [
        "| condition | n | MiniLM cosine [95% CI] | ROUGE-L F1 | chrF "
        "| win rate vs large alone [95% CI] (pairs) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, cell in r["cells"].items():
        vs = cell.get("vs_large")
        win = (
            f"{_f(vs['win_rate'])} [{_f(vs['win_ci'][0])}, {_f(vs['win_ci'][1])}] ({vs['n']})" if vs else "-"
        )
        lines.append(
            f"| {LABELS.get(c, c)} | {cell['n']} | {_ci(cell['cosine'])} | {_ci(cell['rouge_l'])} "
            f"| {_ci(cell['chrf'], '.1f')} | {win} |"
        )
    return lines


def _contrast_table(r: Mapping[str, Any]) -> list[str]:
    lines = [
        "| contrast | A vs B | n | win rate of A [95% CI] (W/T/L) | mean cosine diff [95% CI] "
        "| ROUGE-L / chrF win rate | p (sign) | p (Holm) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cid, c in r["contrasts"].items():
        lines.append(
            f"| {cid} | {LABELS.get(c['a'], c['a'])} vs {LABELS.get(c['b'], c['b'])} | {c['n']} "
            f"| {_f(c['win_rate'])} [{_f(c['win_ci'][0])}, {_f(c['win_ci'][1])}] "
            f"({c['wins']}/{c['ties']}/{c['losses']}) "
            f"| {_f(c['diff'], '+.3f')} [{_f(c['diff_ci'][0], '+.3f')}, {_f(c['diff_ci'][1], '+.3f')}] "
            f"| {_f(c['rouge_l_win_rate'])} / {_f(c['chrf_win_rate'])} | {_f(c['p_sign'], '.3g')} "
            f"| {_f(c['p_holm'], '.3g')} |"
        )
    return lines


def _facts_lines(f: Mapping[str, Any]) -> list[str]:
    lines = [
        "| condition | questions answered | carried the fact | rate [95% Wilson CI] |",
        "| --- | --- | --- | --- |",
    ]
    for c, cell in f["cells"].items():
        lines.append(
            f"| {LABELS.get(c, c)} | {cell['n']} | {cell['carried']} "
            f"| {_f(cell['rate'])} [{_f(cell['ci_low'])}, {_f(cell['ci_high'])}] |"
        )
    shown = f["questions_with_examples"]
    lines += [
        "",
        f"Of the {f['questions']} paraphrased questions, the two-stage selector showed at least one example "
        f"to {shown['small_two_stage']} (small tier) and {shown['large_two_stage']} (large tier); "
        f"examples of the other tenant in any prompt: **{f['other_tenant_examples']}** (stage 1 searched "
        "both tenants' banks "
        "on purpose; the count is read from the selected examples' tenant fields).",
    ]
    return lines


def markdown(r: Mapping[str, Any]) -> str:
    c1 = r["contrasts"].get("C1")
    gen = r["generation"]
    models = r["models"]
    lines = [
        "## Measured quality (issue 8)",
        "",
        "Real models, real references, measured: `python -m bench.quality_eval run` (in pieces) and "
        "`echolm bench quality --update-benchmarks` (this section, `bench/results/quality-cells.json`). "
        "Analysis pre-registered in docs/quality-preregistration.md; method in docs/evaluation.md.",
        "",
        f"- Models: large = {models['large']['name']}, small = {models['small']['name']} (GGUF from "
        f"scripts/models.sh), llama-cpp-python, greedy, at most {gen['max_tokens']} new tokens, "
        f"{gen['n_threads']} CPU threads.",
        f"- Data: {r['data']['source']}; bank {r['data']['bank']} conversations (ChatGPT replies as the "
        f"large model's past answers), live requests from the held-out conversations, reference = ChatGPT's "
        f"reply cut to {r['data']['reference_words']} words. {r['generations_cached']} generations cached.",
        f"- Primary metric: MiniLM cosine to the reference; ties within {r['tie_margins']['cosine']} "
        f"(ROUGE-L {r['tie_margins']['rouge_l']}, chrF {r['tie_margins']['chrf']}). Intervals: paired "
        "bootstrap 95% (10,000 resamples of requests).",
        "",
    ]
    if c1 is None:
        lines.append("No paired primary requests are cached yet.")
        return "\n".join(lines) + "\n"
    verdict = r["parity"]["verdict"]
    short = (
        ""
        if c1["n"] >= 300
        else f"; **this run reached {c1['n']}, so the verdict is provisional until it does.** Generation "
        "on the shared 2-core CPU is the bottleneck; `python -m bench.quality_eval run` continues from the "
        "cache and this section is rewritten from it"
    )
    lines += [
        f"**Parity ({r['parity']['rule']}): {verdict}.** Small + two-stage examples against large alone on "
        f"{c1['n']} paired requests: win rate {_f(c1['win_rate'])} "
        f"[{_f(c1['win_ci'][0])}, {_f(c1['win_ci'][1])}], "
        f"mean cosine {_f(c1['mean_a'])} vs {_f(c1['mean_b'])} (difference {_f(c1['diff'], '+.3f')} "
        f"[{_f(c1['diff_ci'][0], '+.3f')}, {_f(c1['diff_ci'][1], '+.3f')}]). The pre-registered goal was "
        f"300 pairs{short}.",
        "",
        "### Per serving condition",
        "",
        *_cells_table(r),
        "",
        "### Pre-registered contrasts (primary metric, Holm over C1-C7)",
        "",
        *_contrast_table(r),
        "",
    ]
    o = r["selector_ordering"]
    lines += [
        f"**Selector ordering** (two-stage >= top-k >= random on the small model): "
        f"{'holds' if o['holds'] else 'does not hold'} in the point estimates (two-stage - top-k = "
        f"{_f(o['two_stage_minus_topk'], '+.3f')}, top-k - random = "
        f"{_f(o['topk_minus_random'], '+.3f')} cosine).",
        "",
        "### By nearest-neighbour similarity (exploratory)",
        "",
        "| nearest bank cosine | large answered | two-stage showed examples | C1 pairs | C1 win rate |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, b in r["by_bin"].items():
        lines.append(
            f"| {label} | {b['n_large']} | {b['two_stage_with_examples']} | {b['c1_n']} "
            f"| {_f(b['c1_win_rate'])} |"
        )
    mix = r.get("natural_mix")
    if mix:
        pool = mix["pool_by_bin"]
        shares = ", ".join(f"{k} {v / sum(pool.values()):.0%}" for k, v in sorted(pool.items()))
        lines += [
            "",
            "The sample takes up to 200 requests per bin, so close neighbours are over-represented: in the "
            f"live pool the bins are {shares}. **Re-weighted to the pool's own mix, C1's win rate is "
            f"{_f(mix['c1_win_rate'])} [{_f(mix['c1_win_ci'][0])}, {_f(mix['c1_win_ci'][1])}]** "
            "(post-stratified, bootstrap within bins; exploratory, not in the pre-registration). The "
            "gain comes from requests with a near neighbour in the bank; how often those occur is a "
            "property of the traffic, not of echolm.",
        ]
    lines += ["", "### Knowledge transfer: invented facts, two tenants", "", *_facts_lines(r["facts"]), ""]
    j = r["judge"]
    if j["n"]:
        a = j["agreement_with_cosine"]
        lines += [
            "### Pairwise judge (large model, both orders)",
            "",
            f"On {j['n']} primary pairs the judge gives small + two-stage a win rate of "
            f"{_f(j['win_rate_small_two_stage'])} (verdicts {j['verdicts']}); agreement with the cosine "
            f"verdicts {_f(a['agreement'])} (Cohen's kappa {_f(a['kappa'])}; "
            f"{_f(a['decisive_agreement'])} on "
            f"the {a['decisive_n']} pairs both call decisive).",
            "",
        ]
        why = j.get("ties_because")
        if why:
            lines += [
                f"Why the judge's ties: it picked the same position in both orders {why['same_position']} "
                f"times (position bias: its verdict followed the order, not the answers), said T "
                f"{why['said_tie']} times, and gave no readable letter {why['unreadable']} times. Only "
                "where both orders agree does a verdict count; on those the judge and the cosine metric "
                "agree as above, so the judge neither confirms nor contradicts C1 beyond that: a 1.5B "
                "model is too weak a judge for these pairs.",
                "",
            ]
    else:
        lines += ["No pairwise-judge verdicts yet (the judge runs after the pairs; CPU-bound).", ""]
    t = r["timing"]
    if t:
        lines += ["Generation speed on this run's machine (medians, shared 2-core CPU):", ""]
        for tier, v in t.items():
            lines.append(
                f"- {tier}: {v['generations']} generations, {_f(v['median_total_s'], '.1f')} s each, prefill "
                f"{_f(v['median_prefill_tok_s'], '.0f')} tok/s, "
                f"decode {_f(v['median_decode_tok_s'], '.1f')} tok/s"
            )
    return "\n".join(lines) + "\n"


def update_benchmarks(r: Mapping[str, Any], path: Path = ROOT / "BENCHMARKS.md") -> None:
    from bench.report import replace_section

    path.write_text(replace_section(path.read_text(encoding="utf-8"), SECTION, markdown(r)), encoding="utf-8")
