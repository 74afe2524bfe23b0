"""Pure parts of bench/quality_eval: splitting, bins, statistics, cache keys, schedule, facts, judge."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from bench.quality_eval.cache import CachedGeneration, GenerationCache, generation_key
from bench.quality_eval.data import (
    Entry,
    bin_of,
    entries_from_conversations,
    interleave_bins,
    is_moderate,
    split_entries,
    text_hash,
    verify_texts,
)
from bench.quality_eval.facts import carries_fact, load_facts
from bench.quality_eval.judge import agreement, combine, parse_letter
from bench.quality_eval.metrics import cut_words
from bench.quality_eval.schedule import PRIMARY, SECONDARY, build_schedule, fact_question_order
from bench.quality_eval.stats import holm, outcomes, paired_bootstrap, reweighted_mean, sign_test_p, win_rate


# ------------------------------------------------------------------------------------------- data
def _conv(cid: str, *turns: tuple[str, str]) -> dict[str, object]:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_entries_keep_first_human_turn_answered_by_gpt_with_file_positions() -> None:
    convs = [
        _conv("a", ("human", "hi there"), ("gpt", "hello")),
        _conv("b", ("gpt", "I start"), ("human", "odd")),  # starts with the assistant: skipped
        _conv("c", ("human", "q"), ("gpt", "   ")),  # empty reply: skipped
        _conv("d", ("human", "second question"), ("gpt", "answer"), ("human", "more")),
    ]
    entries = entries_from_conversations(convs)
    assert [(e.position, e.conv_id, e.prompt, e.reply) for e in entries] == [
        (0, "a", "hi there", "hello"),
        (3, "d", "second question", "answer"),
    ]


def test_split_is_by_conversation_deterministic_and_independent_of_the_others() -> None:
    entries = [Entry(i, f"conv-{i}", f"prompt {i}", f"reply {i}") for i in range(2000)]
    bank, live = split_entries(entries, bank_fraction=0.8, seed=3)
    assert {e.conv_id for e in bank}.isdisjoint({e.conv_id for e in live})
    assert len(bank) + len(live) == 2000
    assert 0.76 < len(bank) / 2000 < 0.84
    bank_half, _ = split_entries(entries[:1000], bank_fraction=0.8, seed=3)
    assert {e.conv_id for e in bank_half} == {e.conv_id for e in bank if e.position < 1000}
    other_seed, _ = split_entries(entries, bank_fraction=0.8, seed=4)
    assert {e.conv_id for e in other_seed} != {e.conv_id for e in bank}
    with pytest.raises(ValueError, match="bank_fraction"):
        split_entries(entries, bank_fraction=1.0, seed=0)


def test_moderate_filter_bounds_lengths_and_script() -> None:
    ok = Entry(0, "x", " ".join(["word"] * 10), " ".join(["reply"] * 30))
    assert is_moderate(ok)
    assert not is_moderate(Entry(0, "x", "too short", ok.reply))
    assert not is_moderate(Entry(0, "x", ok.prompt, "short reply"))
    assert not is_moderate(Entry(0, "x", " ".join(["词语"] * 10), ok.reply))


def test_bins_cover_the_range_and_interleave_round_robin() -> None:
    assert [bin_of(s) for s in (0.2, 0.5, 0.69, 0.7, 0.85, 0.95, 1.0)] == [
        "none",
        "0.5-0.7",
        "0.5-0.7",
        "0.7-0.8",
        "0.8-0.9",
        "0.9-1.0",
        "0.9-1.0",
    ]
    labels = ["none"] * 10 + ["0.9-1.0"] * 3 + ["0.7-0.8"] * 5
    order = interleave_bins(labels, per_bin=4, seed=0)
    picked = [labels[i] for i in order]
    assert picked[:3] == ["none", "0.7-0.8", "0.9-1.0"]  # BINS order, one of each present bin
    assert picked.count("none") == 4 and picked.count("0.9-1.0") == 3 and picked.count("0.7-0.8") == 4
    assert len(set(order)) == len(order)


def test_verify_texts_refuses_a_changed_text() -> None:
    e = Entry(5, "c5", "prompt", "reply")
    row = {"pos": 5, "id": "c5", "q": text_hash("prompt"), "a": text_hash("reply")}
    assert verify_texts([row], {5: e}) == [e]
    with pytest.raises(ValueError, match="other text"):
        verify_texts([row], {5: Entry(5, "c5", "prompt!", "reply")})
    with pytest.raises(ValueError, match="not at position"):
        verify_texts([row], {4: e})


# ------------------------------------------------------------------------------------------ stats
def test_outcomes_and_win_rate_with_tie_margin() -> None:
    a = [0.50, 0.60, 0.70, 0.41, 0.39]
    b = [0.49, 0.50, 0.80, 0.40, 0.40]
    assert outcomes(a, b, margin=0.02).tolist() == [0.5, 1.0, 0.0, 0.5, 0.5]  # small losses tie too
    assert win_rate(a, b, margin=0.02) == pytest.approx(0.5)
    assert win_rate(a, b, margin=0.0) == pytest.approx(0.6)  # no ties: 3 wins of 5
    with pytest.raises(ValueError, match="paired"):
        outcomes([1.0], [1.0, 2.0], margin=0.0)
    with pytest.raises(ValueError, match="margin"):
        outcomes([1.0], [1.0], margin=-0.1)


def test_paired_bootstrap_interval_covers_the_truth_and_is_paired() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0.6, 0.2, size=400)  # large between-request spread
    a = base + 0.03 + rng.normal(0, 0.01, size=400)  # a small, consistent gain
    r = paired_bootstrap(a, base, margin=0.0, n_boot=2000, seed=0)
    assert r.diff_ci[0] > 0.0  # pairing removes the between-request spread: the gain is detected
    assert r.diff_ci[0] < 0.03 < r.diff_ci[1]
    assert r.win_rate > 0.95 and r.wins + r.ties + r.losses == 400
    assert r.p_sign < 1e-6
    unpaired_width = 2 * 1.96 * math.sqrt(2 * 0.2**2 / 400)
    assert (r.diff_ci[1] - r.diff_ci[0]) < unpaired_width / 5


def test_sign_test_matches_exact_binomial_values() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_p(8, 2) == pytest.approx(2 * 56 / 1024)  # P(X<=2)=(1+10+45)/1024
    assert sign_test_p(600, 400) < 1e-9  # large n does not underflow to an error


def test_holm_adjusts_step_down_and_stays_monotone() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})
    with pytest.raises(ValueError, match="outside"):
        holm({"x": 1.5})


# ------------------------------------------------------------------------------------------ cache
def test_generation_key_changes_with_model_messages_and_params_only() -> None:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    params = {"max_tokens": 96, "temperature": 0.0}
    key = generation_key("m1", msgs, params)
    assert key == generation_key("m1", [dict(m) for m in msgs], dict(reversed(list(params.items()))))
    assert key != generation_key("m2", msgs, params)
    assert key != generation_key("m1", [*msgs[:1], {"role": "user", "content": "q "}], params)
    assert key != generation_key("m1", msgs, {**params, "max_tokens": 64})
    assert key != generation_key("m1", [{"role": "user", "content": "s"}, msgs[1]], params)


def test_cache_round_trips_survives_a_torn_tail_and_compacts(tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path)
    for n in range(3):
        cache.put(CachedGeneration(f"k{n}", "m", f"text {n}", 10, n, 0.1, 0.5, 1.0))
    with cache.path.open("ab") as raw:  # a piece killed mid-write
        raw.write(gzip.compress(b'{"key": "k9", "te')[:20])
    again = GenerationCache(tmp_path)
    assert sorted(again.rows) == ["k0", "k1", "k2"]
    assert again.get("k2") == cache.get("k2")
    assert again.compact() == 3
    assert sorted(GenerationCache(tmp_path).rows) == ["k0", "k1", "k2"]


# --------------------------------------------------------------------------------------- schedule
def test_every_prefix_of_the_schedule_is_paired() -> None:
    jobs = build_schedule(10, 3, secondary_every=2, fact_every=2)
    for cut in range(len(jobs) + 1):
        done: dict[int, set[str]] = {}
        for job in jobs[:cut]:
            if job.kind == "sharegpt":
                done.setdefault(job.item, set()).add(job.condition)
        complete = [i for i, c in done.items() if set(PRIMARY) <= c]
        assert len(done) - len(complete) <= 1  # only the request in flight can be unpaired
    primary = sum(1 for j in jobs if j.kind == "sharegpt" and j.condition == PRIMARY[0])
    secondary = sum(1 for j in jobs if j.kind == "sharegpt" and j.condition == SECONDARY[0])
    assert (primary, secondary) == (10, 5)
    assert [j.item for j in jobs if j.kind == "fact" and j.condition == "small"] == [0, 1, 2]


def test_fact_questions_go_breadth_first() -> None:
    assert fact_question_order([2, 3, 1]) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (1, 2)]


# ------------------------------------------------------------------------------------------ facts
def test_fact_checker_matches_the_token_only() -> None:
    assert carries_fact("Use code zr 1128 to reset it.", "ZR-1128")
    assert carries_fact("ZR1128.", "ZR-1128")
    assert not carries_fact("ZR-11280", "ZR-1128")
    assert not carries_fact("the reset code is ZR-1129", "ZR-1128")
    assert carries_fact("It runs firmware v3.21.456 now", "v3.21.456")
    assert carries_fact("Ask Idris  Vantreck.", "Idris Vantreck")


def test_shipped_fact_sets_are_well_formed() -> None:
    facts = load_facts()
    tenants = {f.tenant for f in facts}
    assert len(tenants) == 2 and len(facts) >= 60
    assert len({(f.tenant, f.fact_token) for f in facts}) == len(facts)
    for f in facts:
        assert len(f.questions) >= 2
        assert not any(carries_fact(q, f.fact_token) for q in f.questions)  # the question never gives it away


# ------------------------------------------------------------------------------------------ judge
def test_judge_needs_both_orders_to_agree() -> None:
    assert parse_letter(" a.") == "A" and parse_letter("**B**") == "B" and parse_letter("Neither") == "?"
    assert combine("A", "B") == "first"
    assert combine("B", "A") == "second"
    assert combine("A", "A") == "tie"  # position bias, not a preference
    assert combine("T", "B") == "tie"
    r = agreement(["first", "second", "tie", "first"], ["first", "first", "tie", "first"])
    assert r["agreement"] == pytest.approx(0.75)
    assert r["decisive_n"] == 3 and r["decisive_agreement"] == pytest.approx(2 / 3)
    assert 0.0 < r["kappa"] < 1.0


def test_cut_words() -> None:
    assert cut_words("a b  c d", 2) == "a b"
    assert cut_words(" a b ", 5) == "a b"


def test_reweighted_mean_carries_strata_means_to_the_pool_mix() -> None:
    per = {"near": [1.0] * 50, "far": [0.0] * 50}  # a 50/50 sample of a pool that is 10% near
    est, (low, high) = reweighted_mean(per, {"near": 10.0, "far": 90.0, "empty": 5.0}, n_boot=500)
    assert est == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    noisy = {"near": [1.0, 0.0] * 20, "far": [0.0, 0.5] * 20}
    est, (low, high) = reweighted_mean(noisy, {"near": 1.0, "far": 3.0}, n_boot=2000)
    assert est == pytest.approx(0.25 * 0.5 + 0.75 * 0.25)
    assert low < est < high and high - low < 0.3
    with pytest.raises(ValueError):
        reweighted_mean({"near": []}, {"near": 1.0})
