"""bench/workloads.py: determinism by seed, split disjointness, Zipf shape, burst peak/mean, loaders."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest

from bench.workloads import (
    ParaphraseGroup,
    WorkloadConfig,
    arrival_times,
    build_workload,
    iter_sharegpt,
    load_contradish_groups,
    load_sharegpt_groups,
    sample_groups,
    split_groups,
    zipf_weights,
)


def synthetic_groups(n: int = 50, size: int = 9) -> list[ParaphraseGroup]:
    return [
        ParaphraseGroup(
            f"g{i:03d}", "test", f"d{i % 5}", tuple(f"question {i} wording {j}" for j in range(size))
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def contradish_groups() -> list[ParaphraseGroup]:
    return load_contradish_groups()


# ------------------------------------------------------------------------------------------ loaders
def test_contradish_groups_merge_versions_and_never_share_a_text(
    contradish_groups: list[ParaphraseGroup],
) -> None:
    # 528 cases, of which 108 v1 cases repeat v2 ids with a subset of their texts.
    assert len(contradish_groups) == 420
    assert len({g.group_id for g in contradish_groups}) == 420
    texts = [" ".join(t.split()).casefold() for g in contradish_groups for t in g.texts]
    assert len(texts) == len(set(texts))
    assert Counter(len(g.texts) for g in contradish_groups).most_common(1)[0][0] == 9
    assert all(g.reference is None and g.source == "contradish" for g in contradish_groups)


def test_sharegpt_decoder_reads_a_truncated_array_incrementally() -> None:
    convs = [
        {
            "id": f"c{i}",
            "conversations": [{"from": "human", "value": f"héllo ✓ {i}"}, {"from": "gpt", "value": "ok"}],
        }
        for i in range(5)
    ]
    blob = json.dumps(convs, ensure_ascii=False, indent=1).encode()
    cut = blob[: blob.index(b'"c4"')]  # the last conversation is cut off mid-object
    items = list(iter_sharegpt(io.BytesIO(cut), chunk_bytes=7))  # tiny chunks split multi-byte chars
    assert [item["id"] for item in items] == ["c0", "c1", "c2", "c3"]
    assert items[2]["conversations"][0]["value"] == "héllo ✓ 2"  # type: ignore[index]

    groups = load_sharegpt_groups(2, stream=io.BytesIO(blob))
    assert [g.texts for g in groups] == [("héllo ✓ 0",), ("héllo ✓ 1",)]
    assert groups[0].reference == "ok"


# -------------------------------------------------------------------------------------------- split
def test_split_is_disjoint_and_every_group_is_on_both_sides(contradish_groups: list[ParaphraseGroup]) -> None:
    split = split_groups(contradish_groups, bank_fraction=0.5, seed=3)
    bank_texts = {r.text for r in split.bank}
    assert not bank_texts & {r.text for r in split.live}
    assert not {r.request_id for r in split.bank} & {r.request_id for r in split.live}
    assert len(split.bank) + len(split.live) == sum(len(g.texts) for g in contradish_groups)
    assert split.bank_groups() == {r.group_id for r in split.live} == {g.group_id for g in contradish_groups}
    assert len(split.live_with_bank()) == len(split.live)


def test_split_keeps_a_text_on_each_side_at_the_extremes_and_honours_novel_groups() -> None:
    groups = synthetic_groups(40)
    for fraction in (0.0, 1.0):
        split = split_groups(groups, bank_fraction=fraction, seed=0)
        assert split.bank_groups() == {r.group_id for r in split.live} == {g.group_id for g in groups}
    split = split_groups(groups, novel_group_fraction=0.5, seed=0)
    novel = {g.group_id for g in groups} - split.bank_groups()
    assert 8 <= len(novel) <= 32
    assert {r.group_id for r in split.live_with_bank()}.isdisjoint(novel)


def test_split_and_sample_are_deterministic_by_seed() -> None:
    groups = synthetic_groups()
    assert split_groups(groups, seed=1) == split_groups(groups, seed=1)
    assert split_groups(groups, seed=1) != split_groups(groups, seed=2)
    ids = [g.group_id for g in groups]
    first = sample_groups(ids, 10, seed=4)
    assert first == sample_groups(ids, 10, seed=4)
    assert set(sample_groups(ids, 10, seed=5, exclude=frozenset(first))).isdisjoint(first)


# ------------------------------------------------------------------------------------------- zipf
def test_zipf_weights_follow_the_power_law() -> None:
    w = zipf_weights(100, 1.2)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2**1.2)
    assert np.all(np.diff(w) < 0)
    assert np.allclose(zipf_weights(10, 0.0), 0.1)


def test_workload_popularity_is_zipf_over_groups() -> None:
    config = WorkloadConfig(seed=7, n_requests=20000, zipf_s=1.0)
    workload = build_workload(synthetic_groups(200), config)
    counts = Counter(workload.group_rank[a.request.group_id] for a in workload.arrivals)
    ranks = np.arange(1, 21)
    freq = np.array([counts[int(r) - 1] for r in ranks], dtype=np.float64)
    slope = np.polyfit(np.log(ranks), np.log(freq), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.15)


# ---------------------------------------------------------------------------------------- arrivals
def per_window_counts(times: np.ndarray, window_s: float) -> np.ndarray:
    return np.bincount((times // window_s).astype(int))[:-1]  # drop the partial last window


def test_arrival_processes_have_the_requested_mean_rate() -> None:
    for process in ("steady", "poisson", "bursty"):
        t = arrival_times(20000, 5.0, process, seed=1)
        assert np.all(np.diff(t) >= 0) and t[0] >= 0
        assert len(t) / t[-1] == pytest.approx(5.0, rel=0.12), process


def test_bursty_peaks_are_several_times_the_mean_and_poisson_are_not() -> None:
    bursty = per_window_counts(arrival_times(20000, 5.0, "bursty", seed=2, burst_peak=4.0), 5.0)
    poisson = per_window_counts(arrival_times(20000, 5.0, "poisson", seed=2), 5.0)
    steady = per_window_counts(arrival_times(20000, 5.0, "steady"), 5.0)
    assert np.percentile(bursty, 99) / bursty.mean() >= 3.0
    assert bursty.max() / bursty.mean() <= 6.0
    assert poisson.max() / poisson.mean() < 2.0
    assert steady.max() / steady.mean() == pytest.approx(1.0, abs=0.05)


def test_bursty_rejects_a_peak_the_calm_rate_cannot_pay_for() -> None:
    with pytest.raises(ValueError, match="burst_peak"):
        arrival_times(10, 1.0, "bursty", burst_peak=12.0, burst_fraction=0.1)


# --------------------------------------------------------------------------------------- workloads
def test_workload_is_deterministic_by_seed_and_mixes_background() -> None:
    groups = synthetic_groups(30)
    background = [
        ParaphraseGroup(f"bg{i}", "sharegpt", "chat", (f"chat prompt {i}",), "a reply") for i in range(40)
    ]
    config = WorkloadConfig(seed=5, n_requests=2000, process="bursty", background_fraction=0.25)
    one = build_workload(groups, config, background=background)
    assert one == build_workload(groups, config, background=background)
    assert one != build_workload(groups, WorkloadConfig(seed=6, n_requests=2000), background=background)
    share = sum(a.request.source == "sharegpt" for a in one.arrivals) / len(one.arrivals)
    assert share == pytest.approx(0.25, abs=0.04)
    live_ids = {a.request.request_id for a in one.arrivals}
    assert live_ids.isdisjoint({r.request_id for r in one.bank})
    assert [a.at for a in one.arrivals] == sorted(a.at for a in one.arrivals)
