"""Stage-2 example selection: token estimates, features, the utility model, the tuner, the selector."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from agents.policy.retrieval import (
    FEATURE_NAMES,
    Selected,
    SelectionResult,
    ThresholdTuner,
    UtilityModel,
    UtilityScorer,
    candidate_features,
    estimate_tokens,
    example_token_budget,
    example_tokens,
    select_examples,
)
from infra.protocols import Example, SearchHit

DIM = 16
NOW = 1_700_000_000.0


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def example_factory(
    example_id: str,
    *,
    request: str | None = None,
    response: str = "Paris.",
    embedding: np.ndarray | None = None,
    tenant: str = "acme",
    quality: float = 0.5,
    usable: bool = True,
    model_tier: str = "large",
    created_at: float = NOW - 3600.0,
    replay_rounds: int = 0,
) -> Example:
    return Example(
        example_id=example_id,
        tenant=tenant,
        request=f"what is the capital of france ({example_id})" if request is None else request,
        response=response,
        embedding=unit(hash(example_id) % 1000) if embedding is None else embedding,
        model_tier=model_tier,
        quality=quality,
        usable=usable,
        created_at=created_at,
        replay_rounds=replay_rounds,
    )


class FixedScorer:
    """Utility by example id: keeps selector tests independent of the learned model."""

    def __init__(self, utilities: dict[str, float]) -> None:
        self.utilities = utilities

    def score(self, query_text: str, hits: Sequence[SearchHit], features: np.ndarray) -> np.ndarray:
        return np.asarray([self.utilities[h.example.example_id] for h in hits], dtype=np.float64)


SELECT_DEFAULTS: dict[str, Any] = {
    "threshold": 0.5,
    "max_examples": 5,
    "min_similarity": 0.5,
    "duplicate_similarity": 0.97,
    "diversity": 0.0,
    "token_budget": 10_000,
    "target_tier": "small",
    "now": NOW,
}


def select(hits: Sequence[SearchHit], utilities: dict[str, float], **overrides: Any) -> SelectionResult:
    kwargs: dict[str, Any] = {**SELECT_DEFAULTS, **overrides}
    return select_examples(
        unit(0), "what is the capital of france", hits, scorer=FixedScorer(utilities), **kwargs
    )


# ------------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("abc", 1),
        ("abcd", 2),  # 4 / 3.5 rounds up
        ("a" * 35, 10),
        ("日本語", 3),  # one token per non-ASCII character
        ("héllo", 2 + 1),  # 4 ASCII -> 2, 'é' -> 1
    ],
)
def test_estimate_tokens_table(text: str, expected: int) -> None:
    assert estimate_tokens(text) == expected


def test_estimate_tokens_over_counts_english_prose() -> None:
    prose = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 20
    assert estimate_tokens(prose) >= len(prose) / 4.0  # ~4 chars/token for English BPE


@pytest.mark.parametrize(
    ("max_input", "prompt", "fraction", "expected"),
    [
        (4096, 100, 0.5, 2048),  # the configured share
        (4096, 3000, 0.5, 4096 - 3000 - 64),  # never crowd the prompt out
        (1024, 2000, 0.5, 0),  # no room at all
    ],
)
def test_example_token_budget(max_input: int, prompt: int, fraction: float, expected: int) -> None:
    got = example_token_budget(max_input_tokens=max_input, prompt_tokens=prompt, context_fraction=fraction)
    assert got == expected


# ----------------------------------------------------------------------------------------- features
def test_candidate_features_values() -> None:
    ex = example_factory(
        "e1",
        request="capital of france",
        response="Paris is the capital.",
        quality=0.7,
        model_tier="large",
        created_at=NOW - 3 * 3600.0,
        replay_rounds=2,
    )
    x = candidate_features(
        unit(0), "what is the capital of france", SearchHit(ex, 0.9), target_tier="small", now=NOW
    )
    f = dict(zip(FEATURE_NAMES, x, strict=True))
    assert x.shape == (len(FEATURE_NAMES),)
    assert f["similarity"] == pytest.approx(0.9)
    assert f["quality"] == pytest.approx(0.7)
    assert f["from_large"] == 1.0
    assert f["same_tier"] == 0.0
    assert f["log_age_hours"] == pytest.approx(math.log1p(3.0))
    assert f["replay_rounds"] == 2.0
    assert f["log_request_tokens"] == pytest.approx(math.log1p(estimate_tokens("capital of france")))
    q, r = estimate_tokens("what is the capital of france"), estimate_tokens("capital of france")
    assert f["length_ratio"] == pytest.approx(min(q, r) / max(q, r))
    assert f["lexical_overlap"] == pytest.approx(3 / 6)  # {capital, of, france} / 6 words


def test_candidate_features_falls_back_to_cosine_when_similarity_missing() -> None:
    v = unit(7)
    x = candidate_features(
        v, "q", SearchHit(example_factory("e", embedding=v), math.nan), target_tier="small", now=NOW
    )
    assert x[0] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------- utility
def feature_row(similarity: float, quality: float) -> np.ndarray:
    x = np.zeros(len(FEATURE_NAMES))
    x[FEATURE_NAMES.index("similarity")] = similarity
    x[FEATURE_NAMES.index("quality")] = quality
    return x


def test_prior_is_half_at_similarity_08_quality_05() -> None:
    assert UtilityModel().predict(feature_row(0.8, 0.5))[0] == pytest.approx(0.5)
    assert isinstance(UtilityModel(), UtilityScorer)


def test_prior_can_be_centred_where_measured_helpfulness_turns() -> None:
    prior = UtilityModel.prior(0.7)
    assert prior.predict(feature_row(0.7, 0.5))[0] == pytest.approx(0.5)
    # a paraphrase at 0.75 passes the 0.5 cut under the serving prior, not under the paper's
    assert prior.predict(feature_row(0.75, 0.5))[0] > 0.5 > UtilityModel().predict(feature_row(0.75, 0.5))[0]


def test_fit_shrinks_towards_its_own_prior_and_remembers_it() -> None:
    x = np.vstack([feature_row(s, 0.5) for s in (0.72, 0.74, 0.76, 0.78)])
    y = np.array([0.5, 0.5, 0.5, 0.5])  # uninformative: the fit stays at the prior it started from
    centred = UtilityModel.prior(0.7).fit(x, y, l2=1e6)
    assert centred.predict(feature_row(0.7, 0.5))[0] == pytest.approx(0.5, abs=0.02)
    restored = UtilityModel.from_dict(json.loads(json.dumps(centred.to_dict())))
    assert restored.prior_similarity == 0.7


def test_serving_state_starts_from_the_settings_prior() -> None:
    from agents.state import DecisionState
    from infra.settings import Settings

    for s_half in (0.7, 0.8):
        settings = Settings(selection={"prior_similarity": s_half})
        state = DecisionState.create(settings)
        assert state.utility.predict(feature_row(s_half, 0.5))[0] == pytest.approx(0.5)


@pytest.mark.parametrize("quality", [0.2, 0.5, 0.9])
def test_prior_is_monotone_in_similarity(quality: float) -> None:
    sims = np.linspace(0.3, 1.0, 15)
    u = UtilityModel().predict(np.vstack([feature_row(s, quality) for s in sims]))
    assert np.all(np.diff(u) > 0) and np.all((u >= 0) & (u <= 1))


@pytest.mark.parametrize("similarity", [0.6, 0.8, 0.95])
def test_prior_is_monotone_in_quality(similarity: float) -> None:
    u = UtilityModel().predict(np.vstack([feature_row(similarity, q) for q in np.linspace(0, 1, 11)]))
    assert np.all(np.diff(u) > 0)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Helpfulness depends on lexical overlap and quality, only weakly on similarity."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, len(FEATURE_NAMES)))
    x[:, FEATURE_NAMES.index("log_request_tokens")] *= 8
    logit = 6 * (x[:, FEATURE_NAMES.index("lexical_overlap")] - 0.5) + 3 * (
        x[:, FEATURE_NAMES.index("quality")] - 0.5
    )
    y = (rng.uniform(0, 1, n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return x, y


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float((pos[:, None] > neg[None, :]).mean())


def test_fit_learns() -> None:
    x, y = synthetic(5000, seed=1)
    model = UtilityModel().fit(x, y)
    x_test, y_test = synthetic(2000, seed=2)
    assert auc(model.predict(x_test), y_test) > 0.75
    assert model.weights[FEATURE_NAMES.index("lexical_overlap")] > 3.0
    assert model.trained_rows == 5000


def test_fit_reaches_the_regularised_optimum() -> None:
    """At the optimum the gradient of the penalised log-loss (in standardised space) vanishes."""
    x, y = synthetic(800, seed=3)
    model = UtilityModel().fit(x, y, l2=1.0, shrink_to_prior=False)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    beta = model.weights * scale
    intercept = model.bias + float(np.sum(model.weights * mean))
    p = model.predict(x)
    z = (x - mean) / scale
    grad_w = z.T @ (p - y) + 1.0 * beta
    grad_b = float(np.sum(p - y)) + 1e-3 * intercept
    assert np.max(np.abs(grad_w)) < 1e-5 and abs(grad_b) < 1e-5


def test_fit_on_little_data_stays_near_the_prior() -> None:
    rng = np.random.default_rng(8)
    x = np.vstack([feature_row(s, q) for s, q in rng.uniform(0.5, 1.0, size=(12, 2))])
    y = rng.integers(0, 2, size=12).astype(np.float64)  # noise: nothing to learn
    shrunk = UtilityModel().fit(x, y)
    sims = np.vstack([feature_row(s, 0.5) for s in np.linspace(0.5, 1.0, 11)])
    assert np.all(np.diff(shrunk.predict(sims)) > 0)  # still monotone in similarity
    assert shrunk.weights[FEATURE_NAMES.index("similarity")] > 5.0


def test_shrinking_to_the_prior_still_learns_from_plenty_of_data() -> None:
    x, y = synthetic(5000, seed=9)
    shrunk, plain = UtilityModel().fit(x, y), UtilityModel().fit(x, y, shrink_to_prior=False)
    assert np.allclose(shrunk.predict(x), plain.predict(x), atol=0.03)


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_fit_on_one_class_stays_finite(label: float) -> None:
    x, _ = synthetic(200, seed=4)
    model = UtilityModel().fit(x, np.full(200, label))
    p = model.predict(x)
    assert np.all(np.isfinite(model.weights)) and math.isfinite(model.bias)
    assert np.all(np.abs(p - label) < 0.2)


def test_sample_weight_zero_ignores_rows() -> None:
    x, y = synthetic(400, seed=5)
    weights = np.ones(400)
    weights[200:] = 0.0
    a = UtilityModel().fit(x, y, sample_weight=weights)
    b = UtilityModel().fit(x[:200], y[:200])
    assert np.allclose(a.predict(x[:200]), b.predict(x[:200]), atol=0.05)


def test_utility_model_round_trips_through_json() -> None:
    x, y = synthetic(300, seed=6)
    model = UtilityModel().fit(x, y)
    restored = UtilityModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.allclose(restored.predict(x), model.predict(x))


def test_utility_model_refuses_foreign_state() -> None:
    state = UtilityModel().to_dict()
    state["feature_names"] = ["similarity"]
    with pytest.raises(ValueError, match="retrain"):
        UtilityModel.from_dict(state)


# ------------------------------------------------------------------------------------------- tuner
def outcomes_with_cut(cut: float, n: int = 400) -> list[tuple[float, bool]]:
    utilities = np.linspace(0.0, 1.0, n)
    return [(float(u), bool(u >= cut)) for u in utilities]


def test_tuner_waits_for_enough_samples() -> None:
    tuner = ThresholdTuner(threshold=0.5, min_samples=50)
    for u, good in outcomes_with_cut(0.8, n=49):
        tuner.observe(u, good)
    assert tuner.tune() == 0.5


@pytest.mark.parametrize(
    ("cut", "objective", "expected"),
    [
        (0.65, "f1", 0.65),
        (0.35, "f1", 0.35),
        (0.65, "gain", 0.65),
        (0.95, "f1", 0.9),  # clamped at the ceiling
        (0.05, "f1", 0.2),  # clamped at the floor
    ],
)
def test_tuner_finds_the_cut_within_bounds(cut: float, objective: str, expected: float) -> None:
    tuner = ThresholdTuner(threshold=0.5, floor=0.2, ceiling=0.9, max_step=0.1, objective=objective)  # type: ignore[arg-type]
    for u, good in outcomes_with_cut(cut):
        tuner.observe(u, good)
    first = tuner.tune()
    assert abs(first - 0.5) <= 0.1 + 1e-12  # bounded step
    for _ in range(10):
        tuner.tune()
    assert tuner.threshold == pytest.approx(expected, abs=0.01)


def test_tuner_is_deterministic_and_windowed() -> None:
    runs = []
    for _ in range(2):
        tuner = ThresholdTuner(window=100, min_samples=10, max_step=1.0)
        for u, good in outcomes_with_cut(0.3, n=300) + outcomes_with_cut(0.7, n=100):
            tuner.observe(u, good)
        runs.append(tuner.tune())
        assert len(tuner) == 100  # only the last window counts: the cut moved to 0.7
    assert runs[0] == runs[1] == pytest.approx(0.7, abs=0.01)


# ---------------------------------------------------------------------------------------- selection
def test_drops_low_similarity_unusable_low_utility_and_foreign_hits() -> None:
    hits = [
        SearchHit(example_factory("good"), 0.9),
        SearchHit(example_factory("far"), 0.4),
        SearchHit(example_factory("bad", usable=False), 0.95),
        SearchHit(example_factory("weak"), 0.9),
        SearchHit(example_factory("other", tenant="globex"), 0.99),
        SearchHit(example_factory("good"), 0.9),
    ]
    result = select(hits, {"good": 0.9, "far": 0.9, "bad": 0.9, "weak": 0.2, "other": 0.9}, tenant="acme")
    assert [s.example.example_id for s in result.selected] == ["good"]
    assert result.dropped == {
        "low_similarity": 1,
        "unusable": 1,
        "low_utility": 1,
        "other_tenant": 1,
        "repeated_id": 1,
    }
    assert result.candidates == 6


def test_drops_near_duplicates_of_kept_examples() -> None:
    v = unit(3)
    near = v + 0.01 * unit(4)
    hits = [
        SearchHit(example_factory("a", embedding=v, request="capital of france?"), 0.9),
        SearchHit(
            example_factory("a2", embedding=near / np.linalg.norm(near), request="france capital"), 0.9
        ),
        SearchHit(example_factory("b", embedding=unit(5), request="how tall is the eiffel tower"), 0.8),
        SearchHit(example_factory("c", embedding=unit(6), request="  Capital   of France? "), 0.8),
    ]
    result = select(hits, {"a": 0.9, "a2": 0.85, "b": 0.7, "c": 0.6})
    assert {s.example.example_id for s in result.selected} == {"a", "b"}
    assert result.dropped == {"near_duplicate": 2}  # a2 by embedding, c by identical text


@pytest.mark.parametrize(
    ("budget", "expected_ids"),
    [
        (10_000, ["e0", "e1", "e2", "e3"]),
        (3 * 108, ["e0", "e1", "e2"]),
        (2 * 108 + 50, ["e0", "e1"]),
        (108, ["e0"]),
        (50, []),
    ],
)
def test_respects_the_token_budget(budget: int, expected_ids: list[str]) -> None:
    examples = [  # 350 characters = 100 tokens each, distinct texts
        example_factory(f"e{i}", request=f"{i}" + "x" * 349, response="", embedding=unit(10 + i))
        for i in range(4)
    ]
    cost = example_tokens(examples[0])
    assert cost == 100 + 8  # request + turn overhead
    utilities = {f"e{i}": 0.9 - 0.1 * i for i in range(4)}
    result = select([SearchHit(e, 0.9) for e in examples], utilities, token_budget=budget)
    assert sorted(s.example.example_id for s in result.selected) == expected_ids
    assert result.tokens <= budget
    assert result.dropped.get("token_budget", 0) == 4 - len(expected_ids)


def test_a_smaller_example_fills_the_budget_left_by_a_big_one() -> None:
    big = example_factory("big", request="x" * 3500, embedding=unit(20))  # ~1000 tokens
    small = example_factory("small", request="x" * 35, embedding=unit(21))
    result = select(
        [SearchHit(big, 0.9), SearchHit(small, 0.9)], {"big": 0.9, "small": 0.6}, token_budget=200
    )
    assert [s.example.example_id for s in result.selected] == ["small"]


def test_orders_best_example_last() -> None:
    utilities = {"a": 0.55, "b": 0.95, "c": 0.75, "d": 0.65}
    hits = [SearchHit(example_factory(k, embedding=unit(30 + i)), 0.9) for i, k in enumerate(utilities)]
    result = select(hits, utilities)
    assert [s.example.example_id for s in result.selected] == ["a", "d", "c", "b"]
    assert all(isinstance(s, Selected) for s in result.selected)
    assert result.selected[-1].utility == pytest.approx(0.95)


def test_caps_the_number_of_examples() -> None:
    utilities = {f"e{i}": 0.6 + 0.05 * i for i in range(6)}
    hits = [SearchHit(example_factory(k, embedding=unit(40 + i)), 0.9) for i, k in enumerate(utilities)]
    result = select(hits, utilities, max_examples=3)
    assert [s.example.example_id for s in result.selected] == ["e3", "e4", "e5"]
    assert result.dropped == {"max_examples": 3}
    assert select(hits, utilities, max_examples=0).selected == ()


def test_diversity_prefers_a_new_topic_over_a_redundant_one() -> None:
    v = unit(50)
    close = v + 0.4 * unit(51)
    close /= np.linalg.norm(close)  # cosine ~0.93 with v: redundant, but not a duplicate
    hits = [
        SearchHit(example_factory("first", embedding=v, request="alpha"), 0.9),
        SearchHit(example_factory("redundant", embedding=close, request="beta"), 0.9),
        SearchHit(example_factory("novel", embedding=unit(52), request="gamma"), 0.9),
    ]
    utilities = {"first": 0.9, "redundant": 0.85, "novel": 0.8}
    focused = select(hits, utilities, diversity=0.0, max_examples=2)
    diverse = select(hits, utilities, diversity=0.5, max_examples=2)
    assert {s.example.example_id for s in focused.selected} == {"first", "redundant"}
    assert {s.example.example_id for s in diverse.selected} == {"first", "novel"}


def test_no_hits_selects_nothing() -> None:
    result = select([], {})
    assert result.selected == () and result.dropped == {} and result.tokens == 0
