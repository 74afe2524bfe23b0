"""Everything a run or a report needs about the requests: texts, vectors, and each condition's prompt.

``Workspace.load()`` reads the manifest and the local corpus cache (``prepare.load_corpus``), the fact
sets and their vectors, and answers ``sharegpt_plan(i)`` / ``fact_plan(j)`` (``conditions.Plan``),
``reference(i)`` and the model tier of a condition. Plans are pure functions of the committed
manifest and the texts, so a report finds the same cache keys the run wrote.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.quality_eval.conditions import CONDITIONS, Candidate, Plan, plan_request
from bench.quality_eval.data import RECALL_K
from bench.quality_eval.facts import Fact, load_facts
from bench.quality_eval.metrics import REFERENCE_WORDS, cut_words
from bench.quality_eval.prepare import LOCAL, MANIFEST, Corpus, embed_texts, load_corpus
from bench.quality_eval.schedule import FACT_CONDITIONS, fact_question_order

__all__ = ["FactQuestion", "Workspace", "tier_of"]

F32 = npt.NDArray[np.float32]
RANDOM_DRAW = 8  # random candidates drawn per request; the first TOPK that fit the budget are shown


def tier_of(condition: str) -> str:
    return "large" if condition.startswith("large") else "small"


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@dataclass(frozen=True, slots=True)
class FactQuestion:
    fact: Fact
    question: str
    index: int  # which of the fact's questions


class Workspace:
    def __init__(self, corpus: Corpus, facts: list[Fact], fact_bank_vectors: F32, fact_question_vectors: F32):
        self.corpus = corpus
        self.facts = facts
        self.questions = [
            FactQuestion(facts[f], facts[f].questions[q], q)
            for f, q in fact_question_order([len(x.questions) for x in facts])
        ]
        self.fact_bank_vectors = fact_bank_vectors
        self.fact_question_vectors = fact_question_vectors

    @classmethod
    def load(cls, manifest: Path = MANIFEST, local: Path = LOCAL) -> Workspace:
        corpus = load_corpus(manifest, local)
        facts = load_facts()
        order = fact_question_order([len(x.questions) for x in facts])
        texts = [x.bank_question for x in facts] + [facts[f].questions[q] for f, q in order]
        path = local / "fact-vectors.npz"
        digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        vectors: F32 | None = None
        if path.is_file():
            with np.load(path) as z:
                if str(z["digest"]) == digest:
                    vectors = z["vectors"]
        if vectors is None:
            vectors = embed_texts(texts)
            local.mkdir(parents=True, exist_ok=True)
            np.savez(path, vectors=vectors, digest=np.asarray(digest))
        return cls(corpus, facts, vectors[: len(facts)], vectors[len(facts) :])

    # -- ShareGPT -----------------------------------------------------------------------------------
    @property
    def n_live(self) -> int:
        return len(self.corpus.live)

    def prompt(self, i: int) -> str:
        return self.corpus.live[i].prompt

    def reference(self, i: int) -> str:
        return cut_words(self.corpus.live[i].reply, REFERENCE_WORDS)

    def _bank_candidate(self, j: int, similarity: float) -> Candidate:
        entry = self.corpus.bank[j]
        return Candidate(
            example_id=f"sharegpt-{entry.conv_id}",
            tenant="bench",
            request=entry.prompt,
            response=entry.reply,
            embedding=self.corpus.bank_vectors[j],
            similarity=similarity,
        )

    def sharegpt_candidates(self, i: int) -> tuple[list[Candidate], list[Candidate]]:
        """Live request ``i``'s stage-1 recall (nearest first) and its seeded random pool."""
        row = self.corpus.manifest.live[i]
        recall = [self._bank_candidate(int(j), float(s)) for j, s in row["recall"][:RECALL_K]]
        rng = np.random.default_rng(_seed(self.corpus.live[i].conv_id))
        picks = rng.choice(len(self.corpus.bank), size=RANDOM_DRAW, replace=False)
        vector = self.corpus.live_vectors[i]
        pool = [self._bank_candidate(int(j), float(vector @ self.corpus.bank_vectors[int(j)])) for j in picks]
        return recall, pool

    @cache  # noqa: B019 - one workspace per process; plans are small
    def sharegpt_plan(self, i: int) -> Plan:
        recall, pool = self.sharegpt_candidates(i)
        vector = self.corpus.live_vectors[i]
        return plan_request(self.prompt(i), vector, recall, pool, conditions=CONDITIONS)

    # -- facts --------------------------------------------------------------------------------------
    @cache  # noqa: B019
    def fact_plan(self, j: int) -> Plan:
        """Stage 1 over *both* tenants' banks (as if the store did not filter), tenant passed to the
        selector: any example of the other tenant in a prompt would be a leak the selector let through."""
        q = self.questions[j]
        vector = self.fact_question_vectors[j]
        sims = self.fact_bank_vectors @ vector
        order = np.argsort(-sims, kind="stable")[:RECALL_K]
        recall = [
            Candidate(
                example_id=self.facts[k].fact_id,
                tenant=self.facts[k].tenant,
                request=self.facts[k].bank_question,
                response=self.facts[k].bank_answer,
                embedding=self.fact_bank_vectors[k],
                similarity=float(sims[k]),
            )
            for k in order
        ]
        return plan_request(q.question, vector, recall, [], tenant=q.fact.tenant, conditions=FACT_CONDITIONS)
