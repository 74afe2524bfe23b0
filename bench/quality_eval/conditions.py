"""The prompt (or stored answer) of every measured serving condition for one live request. Pure.

Conditions (``CONDITIONS``), each on the same live request:

    small               the small model, no examples
    small_two_stage     the small model with the pipeline's own selection: stage-1 recall (the
                        ``RECALL_K`` nearest bank prompts), ``select_examples`` with the untrained
                        ``UtilityModel`` at the paper's 0.8 (the prior the n=324 run used; serving
                        has since moved to 0.7 from its results), the serving defaults of
                        ``SelectionSettings`` and of the prepare agent's token budget,
                        ``target_tier="small"``
    small_topk          the small model with the ``TOPK`` nearest bank entries (no utility, no
                        threshold), best last, skipping one that does not fit the same token budget
    small_random        the small model with ``TOPK`` bank entries drawn at random (seeded by request)
    semantic_cache      no generation: the nearest bank entry's stored answer
    large               the large model, no examples
    large_two_stage     the large model with the two-stage selection for ``target_tier="large"``

Examples go through ``agents.policy.prompt.build_messages`` with the serving's system prompt, so a
prompt here is byte for byte what the serve agent would send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agents.policy.features import example_tokens
from agents.policy.prompt import build_messages
from agents.policy.retrieval import Selected, UtilityModel, select_examples
from agents.policy.utility import PAPER_PRIOR_SIMILARITY
from infra.protocols import ChatMessage, Example, SearchHit
from infra.settings import SelectionSettings, TGISettings

__all__ = [
    "CONDITIONS",
    "GENERATED",
    "SERVING_TOKEN_BUDGET",
    "SYSTEM_PROMPT",
    "TOPK",
    "Candidate",
    "Plan",
    "plan_request",
]

CONDITIONS = (
    "small",
    "small_two_stage",
    "small_topk",
    "small_random",
    "semantic_cache",
    "large",
    "large_two_stage",
)
GENERATED = tuple(c for c in CONDITIONS if c != "semantic_cache")
TOPK = 2
SERVING_TOKEN_BUDGET = 1024  # agents.state's default token_budget for the prepare agent
SYSTEM_PROMPT = TGISettings.model_fields["system_prompt"].default
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One bank entry as the store would return it for a request."""

    example_id: str
    tenant: str
    request: str
    response: str
    embedding: F32
    similarity: float

    def hit(self) -> SearchHit:
        example = Example(
            example_id=self.example_id,
            tenant=self.tenant,
            request=self.request,
            response=self.response,
            embedding=self.embedding,
            model_tier="large",
            quality=0.5,  # what `echolm bank import` gives an entry without a quality
        )
        return SearchHit(example, float(self.similarity))


@dataclass(frozen=True, slots=True)
class Plan:
    """What each condition sends: ``messages[c]`` for generated conditions, ``cached_answer`` for the
    semantic cache, and the ids (and tenants) of the examples each condition showed."""

    messages: dict[str, list[ChatMessage]]
    examples: dict[str, list[tuple[str, str]]]  # condition -> [(example id, tenant)]
    cached_answer: str | None


# The measured run's selector: its cached generations are keyed by prompt, so this stays what it ran.
RUN_PRIOR_SIMILARITY = PAPER_PRIOR_SIMILARITY


def _two_stage(
    vector: F32, prompt: str, hits: Sequence[SearchHit], *, tier: str, tenant: str | None
) -> list[Selected]:
    s = SelectionSettings()
    result = select_examples(
        vector,
        prompt,
        hits,
        scorer=UtilityModel.prior(RUN_PRIOR_SIMILARITY),
        threshold=s.utility_threshold,
        max_examples=s.max_examples,
        min_similarity=s.min_similarity,
        duplicate_similarity=s.duplicate_similarity,
        diversity=s.diversity,
        token_budget=SERVING_TOKEN_BUDGET,
        target_tier=tier,
        now=0.0,
        tenant=tenant,
    )
    return list(result.selected)


def _fit(hits: Sequence[SearchHit], k: int) -> list[Selected]:
    """Up to ``k`` of ``hits`` in the given order that fit the serving token budget, best last."""
    kept: list[Selected] = []
    budget = SERVING_TOKEN_BUDGET
    for h in hits:
        cost = example_tokens(h.example)
        if cost <= budget and len(kept) < k:
            kept.append(Selected(h.example, h.similarity, float("nan")))
            budget -= cost
    return kept[::-1]


def plan_request(
    prompt: str,
    vector: F32,
    recall: Sequence[Candidate],
    random_pool: Sequence[Candidate],
    *,
    tenant: str | None = None,
    conditions: Sequence[str] = CONDITIONS,
) -> Plan:
    """Every condition's prompt for one request. ``recall`` is stage 1 (nearest first); ``random_pool``
    is the random condition's draw (already seeded by the caller)."""
    hits = [c.hit() for c in recall]
    chosen: dict[str, list[Selected]] = {"small": [], "large": []}
    if "small_two_stage" in conditions:
        chosen["small_two_stage"] = _two_stage(vector, prompt, hits, tier="small", tenant=tenant)
    if "large_two_stage" in conditions:
        chosen["large_two_stage"] = _two_stage(vector, prompt, hits, tier="large", tenant=tenant)
    if "small_topk" in conditions:
        own = [h for h in hits if tenant is None or h.example.tenant == tenant]
        chosen["small_topk"] = _fit(own, TOPK)
    if "small_random" in conditions:
        chosen["small_random"] = _fit([c.hit() for c in random_pool], TOPK)
    messages = {c: build_messages(SYSTEM_PROMPT, chosen[c], prompt) for c in conditions if c in chosen}
    examples = {c: [(s.example.example_id, s.example.tenant) for s in chosen[c]] for c in messages}
    cached = recall[0].response if recall and "semantic_cache" in conditions else None
    return Plan(messages=messages, examples=examples, cached_answer=cached)
