"""Offline example-selection quality: does the two-stage selector help the real small model?

    python -m bench.selection_quality --preset small        # < 10 min on 2 cores
    python -m bench.selection_quality --preset full --max-minutes 9   # run again until it finishes

Live requests from contradish paraphrase groups (``bench.workloads``) are answered by SmolLM2-135M
(dev TGI servers started here) under each condition:

    none            no examples
    random          k examples drawn uniformly from the bank (negative control)
    similarity      the k nearest bank entries by embedding cosine
    two-stage       ``select_examples`` over the recall set with the untrained ``UtilityModel``
    two-stage-trained  the same with a ``UtilityModel`` fitted on sampled outcomes of *other* groups

and two rows that cost no generation, for scale: ``semantic-cache`` (reply with the nearest bank
entry's answer, the paper's plain semantic caching) and ``large-resample`` (another sample of the
"large model" for the same request: roughly what a perfect copy of the large model would score).

The "large model" is the same SmolLM2 in a stronger setup, best-of-``best_of`` samples
(temperature 0.7) picked by ``ReferenceFreeScorer``, the product's replay scorer; it writes the bank's
answers and, for each evaluated request, the reference answer. Quality is ``reference_score``
(embedding cosine and token F1 against that reference). See docs/evaluation.md for why and for the
limits. Generations are cached on disk by (model, messages, parameters), so an interrupted run
(``--max-minutes``) continues where it stopped, and a rerun gives the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agents.policy.features import estimate_tokens
from agents.policy.prompt import build_messages
from agents.policy.retrieval import (
    Selected,
    ThresholdTuner,
    UtilityModel,
    candidate_features,
    example_token_budget,
    select_examples,
)
from agents.scorers import ReferenceFreeScorer
from bench.quality import ReferenceScorer, compare, summarize
from bench.selection_quality_pool import GenerationPool, Preset, run_all, seed_of
from bench.workloads import (
    ParaphraseGroup,
    Request,
    load_contradish_groups,
    load_sharegpt_groups,
    sample_groups,
    split_groups,
)
from infra.embedding import SentenceTransformerEmbedder
from infra.protocols import ChatMessage, Example, Generation, GenerationParams, SearchHit
from infra.settings import SelectionSettings

T = TypeVar("T")

SYSTEM_PROMPT = "You are a helpful assistant. Answer the user's question briefly and accurately."
CONDITIONS = ("none", "random", "similarity", "two-stage", "two-stage-trained")
FREE_ROWS = ("semantic-cache", "large-resample")
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path.home() / ".cache" / "echolm" / "selection-quality.jsonl"


# ------------------------------------------------------------------------------------ the bench
@dataclass(slots=True)
class LargeAnswer:
    text: str  # the best of the samples
    quality: float  # its ReferenceFreeScorer score
    other: str  # another sample (the next best): the "large-resample" row


class MemoEmbedder:
    """An ``Embedder`` that remembers every text it embedded: the scorers ask about the same texts many
    times, and one batched pass is far cheaper than many small ones on a busy CPU."""

    def __init__(self, inner: SentenceTransformerEmbedder) -> None:
        self.inner = inner
        self.dimension = inner.dimension
        self.memo: dict[str, np.ndarray] = {}

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, await self.inner.embed(missing), strict=True))
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self.memo[t] for t in texts])

    async def aclose(self) -> None:
        return None


class Bench:
    def __init__(
        self, preset: Preset, pool: GenerationPool, embedder: SentenceTransformerEmbedder, info_max_input: int
    ):
        self.p = preset
        self.pool = pool
        self.embedder = MemoEmbedder(embedder)
        self.max_input = info_max_input
        self.rfs = ReferenceFreeScorer(self.embedder)
        self.scorer = ReferenceScorer(self.embedder)
        self.selection = SelectionSettings()
        self.small = GenerationParams(max_new_tokens=preset.max_new_tokens)

    # -- the "large model": best-of-n of the same model ------------------------------------------
    async def sample(self, text: str, i: int) -> str:
        """Sample ``i`` of the large setup for ``text`` (seeded by the text, so it is reproducible)."""
        params = GenerationParams(
            max_new_tokens=self.p.max_new_tokens,
            temperature=self.p.temperature,
            seed=seed_of("large", text, i),
        )
        messages = [ChatMessage("system", SYSTEM_PROMPT), ChatMessage("user", text)]
        return (await self.pool.generate(messages, params)).text

    async def large(self, texts: Sequence[str], label: str) -> list[LargeAnswer]:
        """Best-of-n for each text: every sample first (the servers stay busy), then one embedding pass."""
        n = self.p.best_of
        jobs = [lambda t=t, i=i: self.sample(t, i) for t in texts for i in range(n)]
        flat = await run_all(label, jobs)
        await self.embedder.embed([*texts, *flat])  # fills the memo: the scorer below reads it
        out = []
        for k, text in enumerate(texts):
            samples = flat[k * n : (k + 1) * n]
            scores = await self.rfs.score(text, samples)
            order = np.argsort(-np.asarray(scores), kind="stable")
            best, other = int(order[0]), int(order[min(1, n - 1)])
            out.append(LargeAnswer(samples[best], float(scores[best]), samples[other]))
        return out

    async def answer(self, text: str, examples: Sequence[Selected]) -> Generation:
        return await self.pool.generate(build_messages(SYSTEM_PROMPT, examples, text), self.small)

    def budget(self, text: str) -> int:
        return example_token_budget(
            max_input_tokens=self.max_input,
            prompt_tokens=estimate_tokens(text) + self.p.max_new_tokens,
            context_fraction=self.selection.context_fraction,
        )

    def two_stage(
        self,
        request: Request,
        vector: np.ndarray,
        hits: Sequence[SearchHit],
        model: UtilityModel,
        threshold: float,
    ) -> list[Selected]:
        s = self.selection
        result = select_examples(
            vector.astype(np.float32),
            request.text,
            hits,
            scorer=model,
            threshold=threshold,
            max_examples=self.p.k,
            min_similarity=s.min_similarity,
            duplicate_similarity=s.duplicate_similarity,
            diversity=s.diversity,
            token_budget=self.budget(request.text),
            target_tier="small",
            now=0.0,
        )
        return list(result.selected)


def _example(request: Request, vector: np.ndarray, answer: LargeAnswer | None) -> Example:
    return Example(
        example_id=request.request_id,
        tenant="bench",
        request=request.text,
        response=answer.text if answer is not None else "",
        embedding=vector.astype(np.float32),
        model_tier="large",
        quality=answer.quality if answer is not None else 0.5,
    )


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _training_summary(
    trained: UtilityModel,
    tuner: ThresholdTuner,
    x: np.ndarray,
    y: np.ndarray,
    bank: Sequence[Request],
    train_requests: Sequence[Request],
    train_picks: dict[str, list[int]],
) -> dict[str, Any]:
    """The utility model's training facts: rows, positive rates by group, in-sample AUCs, the model."""
    same = [bank[j].group_id == r.group_id for r in train_requests for j in train_picks[r.request_id]]
    other = [not s for s in same]
    return {
        "rows": len(y),
        "positive_rate": float(y.mean()),
        "threshold": tuner.threshold,
        "tuner_moved": len(tuner) >= tuner.min_samples,
        "in_sample_auc_trained": _auc(trained.predict(x), y),
        "in_sample_auc_untrained": _auc(UtilityModel().predict(x), y),
        "auc_similarity_alone": _auc(x[:, 0], y),
        "positive_rate_same_group": float(y[same].mean()),
        "positive_rate_other_group": float(y[other].mean()) if any(other) else float("nan"),
        "model": trained.to_dict(),
    }


def _condition_report(
    c: str,
    p: Preset,
    score: dict[str, np.ndarray],
    scored: dict[str, Any],
    chosen: dict[str, list[list[Selected]]],
    eval_requests: Sequence[Request],
    gen: dict[tuple[str, int], Generation],
) -> dict[str, Any]:
    """One condition's row: quality, win rates against none and similarity, and what it showed."""
    entry: dict[str, Any] = {
        "quality": summarize(score[c], seed=p.seed),
        "cosine": float(np.mean([s.cosine for s in scored[c]])),
        "f1": float(np.mean([s.f1 for s in scored[c]])),
        "vs_none": compare(score[c], score["none"], tie=p.tie, seed=p.seed),
        "vs_similarity": compare(score[c], score["similarity"], tie=p.tie, seed=p.seed),
    }
    if c in CONDITIONS:
        used = [len(s) for s in chosen[c]]
        same = [
            sum(sel.example.example_id.split("/")[0] == r.group_id for sel in s)
            for s, r in zip(chosen[c], eval_requests, strict=True)
        ]
        entry |= {
            "examples_mean": float(np.mean(used)),
            "requests_with_examples": float(np.mean([u > 0 for u in used])),
            "same_group_share": float(sum(same) / sum(used)) if sum(used) else float("nan"),
            "prompt_tokens_added": float(
                np.mean(
                    [
                        gen[(c, i)].prompt_tokens - gen[("none", i)].prompt_tokens
                        for i in range(len(eval_requests))
                    ]
                )
            ),
            "latency_s": float(np.mean([gen[(c, i)].latency_s for i in range(len(eval_requests))])),
        }
    return entry


def _sample_requests(p: Preset) -> tuple[Any, list[Request], list[Request]]:
    """The bank/live split and one live request per sampled group, for evaluation and for training."""
    groups: list[ParaphraseGroup] = load_contradish_groups()
    background = load_sharegpt_groups(p.background) if p.background else []
    split = split_groups([*groups, *background], bank_fraction=p.bank_fraction, seed=p.seed)
    live_by_group: dict[str, list[Request]] = {}
    for r in split.live_with_bank():
        if r.source == "contradish":
            live_by_group.setdefault(r.group_id, []).append(r)
    eval_groups = sample_groups(list(live_by_group), p.n_eval, seed=p.seed)
    train_groups = sample_groups(
        list(live_by_group), p.n_train, seed=p.seed + 1, exclude=frozenset(eval_groups)
    )
    rng = np.random.default_rng(p.seed)
    eval_requests = [live_by_group[g][int(rng.integers(len(live_by_group[g])))] for g in eval_groups]
    train_requests = [live_by_group[g][int(rng.integers(len(live_by_group[g])))] for g in train_groups]

    return split, eval_requests, train_requests


def _random_picks(
    p: Preset, bank: Sequence[Request], needed: Sequence[int], eval_requests: Sequence[Request]
) -> dict[str, list[int]]:
    """The negative control: ``p.k`` answered bank entries of other groups per evaluated request."""
    random_picks: dict[str, list[int]] = {}
    for r in eval_requests:
        pool_j = [j for j in needed if bank[j].group_id != r.group_id]
        pick = np.random.default_rng(seed_of("random", p.seed, r.request_id)).choice(
            len(pool_j), p.k, replace=False
        )
        random_picks[r.request_id] = [pool_j[int(i)] for i in pick]
    return random_picks


async def _recorded_answers(
    bench: Bench, bank: Sequence[Request], needed: Sequence[int]
) -> dict[int, LargeAnswer]:
    """ShareGPT distractors keep their recorded reply as their "large-model" answer."""
    recorded: dict[int, LargeAnswer] = {}
    for j in needed:
        if bank[j].reference is not None:
            text = bank[j].reference or ""
            recorded[j] = LargeAnswer(text, (await bench.rfs.score(bank[j].text, [text]))[0], text)
    return recorded


def _tuned(trained: UtilityModel, x: np.ndarray, y: np.ndarray, threshold: float) -> ThresholdTuner:
    """A threshold tuner fed the trained model's in-sample outcomes, re-tuned until it settles."""
    tuner = ThresholdTuner(threshold=threshold)
    for u, good in zip(trained.predict(x), y, strict=True):
        tuner.observe(float(u), bool(good))
    for _ in range(50):  # the product re-tunes on a timer; here until it settles
        before = tuner.threshold
        if tuner.tune() == before:
            break
    return tuner


async def evaluate(
    p: Preset, pool: GenerationPool, embedder: SentenceTransformerEmbedder, max_input: int
) -> dict[str, Any]:
    started = time.perf_counter()
    bench = Bench(p, pool, embedder, max_input)
    split, eval_requests, train_requests = _sample_requests(p)

    # -- embeddings and stage-1 recall (exact cosine over the whole bank) --------------------------
    bank = list(split.bank)
    bank_vectors = np.asarray(await embedder.embed([r.text for r in bank]), dtype=np.float64)
    asked = [*eval_requests, *train_requests]
    ask_vectors = np.asarray(await embedder.embed([r.text for r in asked]), dtype=np.float64)
    vector_of = {r.request_id: ask_vectors[i] for i, r in enumerate(asked)}
    sims = ask_vectors @ bank_vectors.T
    recall = {
        r.request_id: [int(j) for j in np.argsort(-sims[i], kind="stable")[: p.recall_k]]
        for i, r in enumerate(asked)
    }
    sim_of = {r.request_id: sims[i] for i, r in enumerate(asked)}
    train_picks = {
        r.request_id: sorted(
            int(j)
            for j in np.random.default_rng(seed_of("train", p.seed, r.request_id)).choice(
                recall[r.request_id], p.train_candidates, replace=False
            )
        )
        for r in train_requests
    }

    # -- "large-model" answers: the bank entries any condition may show, and the references --------
    # The negative control draws from the answered entries of *other* groups (a uniform draw from the
    # whole bank would hit the request's own group with probability under 0.3%; this keeps it at 0
    # without generating answers for entries nothing else needs).
    needed = sorted(
        {j for r in eval_requests for j in recall[r.request_id]}
        | {j for js in train_picks.values() for j in js}
    )
    random_picks = _random_picks(p, bank, needed, eval_requests)
    to_generate = [j for j in needed if bank[j].reference is None]
    print(
        f"bank {len(bank)} entries; {len(needed)} shown to the small model; {len(asked)} references",
        flush=True,
    )
    answers = await bench.large([bank[j].text for j in to_generate], "large: bank answers")
    bank_answer: dict[int, LargeAnswer] = dict(zip(to_generate, answers, strict=True))
    bank_answer |= await _recorded_answers(bench, bank, needed)
    reference_list = await bench.large([r.text for r in asked], "large: references")
    references = dict(zip([r.request_id for r in asked], reference_list, strict=True))

    def hit(request: Request, j: int) -> SearchHit:
        return SearchHit(
            _example(bank[j], bank_vectors[j], bank_answer.get(j)), float(sim_of[request.request_id][j])
        )

    # -- training the utility model on sampled outcomes of the training groups ---------------------
    def answer_with(r: Request, hits: Sequence[SearchHit]) -> Callable[[], Awaitable[Generation]]:
        """``r`` answered with ``hits`` as its examples, as a job for ``run_all``."""
        return lambda: bench.answer(r.text, [Selected(h.example, h.similarity, float("nan")) for h in hits])

    train_jobs: list[Callable[[], Awaitable[Generation]]] = []
    for r in train_requests:
        train_jobs.append(answer_with(r, []))
        for j in train_picks[r.request_id]:
            train_jobs.append(answer_with(r, [hit(r, j)]))
    train_out = await run_all("train: outcomes", train_jobs)
    train_scores = await bench.scorer.score(
        [g.text for g in train_out],
        [references[r.request_id].text for r in train_requests for _ in range(1 + p.train_candidates)],
    )
    x_rows, labels = [], []
    per = 1 + p.train_candidates
    for i, r in enumerate(train_requests):
        base = train_scores[i * per].score
        for slot, j in enumerate(train_picks[r.request_id]):
            x_rows.append(
                candidate_features(
                    vector_of[r.request_id].astype(np.float32),
                    r.text,
                    hit(r, j),
                    target_tier="small",
                    now=0.0,
                )
            )
            labels.append(1.0 if train_scores[i * per + 1 + slot].score > base else 0.0)
    x, y = np.vstack(x_rows), np.asarray(labels)
    trained = UtilityModel.default().fit(x, y)
    tuner = _tuned(trained, x, y, bench.selection.utility_threshold)
    training = _training_summary(trained, tuner, x, y, bank, train_requests, train_picks)

    # -- the evaluated conditions ----------------------------------------------------------------
    untrained = UtilityModel()
    chosen: dict[str, list[list[Selected]]] = {c: [] for c in CONDITIONS}
    for r in eval_requests:
        hits = [hit(r, j) for j in recall[r.request_id]]
        v = vector_of[r.request_id]
        chosen["none"].append([])
        picks = [hit(r, j) for j in random_picks[r.request_id]]
        chosen["random"].append([Selected(h.example, h.similarity, float("nan")) for h in picks])
        top = sorted(hits[: p.k], key=lambda h: h.similarity)  # best last, like select_examples
        chosen["similarity"].append([Selected(h.example, h.similarity, float("nan")) for h in top])
        chosen["two-stage"].append(bench.two_stage(r, v, hits, untrained, bench.selection.utility_threshold))
        chosen["two-stage-trained"].append(bench.two_stage(r, v, hits, trained, tuner.threshold))

    def condition_job(c: str, i: int) -> Callable[[], Awaitable[Generation]]:
        """Request ``i`` answered with condition ``c``'s chosen examples, as a job for ``run_all``."""
        return lambda: bench.answer(eval_requests[i].text, chosen[c][i])

    jobs = [(c, i) for c in CONDITIONS for i in range(len(eval_requests))]
    outs = await run_all("small: conditions", [condition_job(c, i) for c, i in jobs])
    gen = {key: out for key, out in zip(jobs, outs, strict=True)}

    # -- scoring ----------------------------------------------------------------------------------
    refs = [references[r.request_id].text for r in eval_requests]
    rows: dict[str, list[str]] = {
        c: [gen[(c, i)].text for i in range(len(eval_requests))] for c in CONDITIONS
    }
    rows["semantic-cache"] = [bank_answer[recall[r.request_id][0]].text for r in eval_requests]
    rows["large-resample"] = [references[r.request_id].other for r in eval_requests]
    scored = {c: await bench.scorer.score(texts, refs) for c, texts in rows.items()}
    score = {c: np.asarray([s.score for s in v]) for c, v in scored.items()}

    report = {
        c: _condition_report(c, p, score, scored, chosen, eval_requests, gen)
        for c in (*CONDITIONS, *FREE_ROWS)
    }

    return {
        "preset": asdict(p),
        "conditions": report,
        "training": training,
        "bank_entries": len(bank),
        "bank_answers_generated": len(to_generate),
        "requests": [
            {
                "request_id": r.request_id,
                "recall_same_group": int(sum(bank[j].group_id == r.group_id for j in recall[r.request_id])),
                "scores": {c: float(score[c][i]) for c in score},
                "examples": {c: [s.example.example_id for s in chosen[c][i]] for c in CONDITIONS},
            }
            for i, r in enumerate(eval_requests)
        ],
        "training_requests": [r.request_id for r in train_requests],
        "generated_this_run": pool.generated,
        "wall_s": time.perf_counter() - started,
    }


if __name__ == "__main__":
    from bench.selection_quality_cli import main

    raise SystemExit(main())
