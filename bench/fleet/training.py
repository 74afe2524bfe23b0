"""echolm's stage-2 utility model, fitted offline on groups the benchmark never serves."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet.preset import SMALL, TENANT, FleetPreset
from bench.fleet.workbench import bank_answer

__all__ = ["train_utility"]


async def train_utility(
    preset: FleetPreset, embedder: Any, exclude_groups: frozenset[str], out: Path
) -> dict[str, Any]:
    """Fit echolm's stage-2 utility model offline, as the paper does, on groups the benchmark never serves.

    ``training_groups`` other contradish groups are split like the workload; every live request's top
    ``selection.top_k`` bank neighbours become (features, label) rows with ``candidate_features``, the
    selector's own features, labelled 1 when the candidate is a rewording of the request: under the
    quality model that is exactly when an example helps (``small_match`` > ``small_alone`` >
    ``small_related``). ``UtilityModel.fit`` and ``ThresholdTuner`` are the product's own; the result
    is written where ``selection.utility_model_path`` points the worker.
    """
    from agents.policy.features import candidate_features
    from agents.policy.retrieval import ThresholdTuner, UtilityModel
    from bench.workloads import load_contradish_groups, sample_groups, split_groups
    from infra.protocols import Example, SearchHit
    from infra.settings import SelectionSettings

    pool = [g for g in load_contradish_groups() if g.group_id not in exclude_groups]
    chosen = set(
        sample_groups([g.group_id for g in pool], min(preset.training_groups, len(pool)), seed=preset.seed)
    )
    split = split_groups(
        [g for g in pool if g.group_id in chosen], bank_fraction=preset.bank_fraction, seed=preset.seed
    )
    bank_vectors = np.asarray(await embedder.embed([r.text for r in split.bank]), dtype=np.float64)
    live_vectors = np.asarray(await embedder.embed([r.text for r in split.live]), dtype=np.float64)
    now = time.time()
    examples = [
        Example(
            example_id=r.request_id,
            tenant=TENANT,
            request=r.text,
            response=bank_answer(r.text, preset.tokens_median),
            embedding=bank_vectors[i].astype(np.float32),
            created_at=now,
            updated_at=now,
        )
        for i, r in enumerate(split.bank)
    ]
    top_k = SelectionSettings().top_k
    rows, labels = [], []
    for i, request in enumerate(split.live):
        sims = bank_vectors @ live_vectors[i]
        for j in np.argsort(-sims)[:top_k]:
            hit = SearchHit(examples[j], float(sims[j]))
            rows.append(
                candidate_features(
                    live_vectors[i].astype(np.float32), request.text, hit, target_tier=SMALL, now=now
                )
            )
            labels.append(float(split.bank[j].group_id == request.group_id))
    x, y = np.vstack(rows), np.asarray(labels)
    model = UtilityModel.default().fit(x, y)
    tuner = ThresholdTuner(threshold=SelectionSettings().utility_threshold)
    for u, good in zip(model.predict(x), y, strict=True):
        tuner.observe(float(u), bool(good))
    for _ in range(50):
        before = tuner.threshold
        if tuner.tune() == before:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model.to_dict(), "threshold": tuner.threshold}))  # noqa: ASYNC240 - once
    predicted = model.predict(x) >= tuner.threshold
    return {
        "groups": len(chosen),
        "rows": len(y),
        "positive_rate": float(y.mean()),
        "threshold": tuner.threshold,
        "precision": float(y[predicted].mean()) if predicted.any() else math.nan,
        "recall": float(predicted[y == 1].mean()) if (y == 1).any() else math.nan,
        "untrained_recall_at_0.5": float((UtilityModel.default().predict(x)[y == 1] >= 0.5).mean()),
    }
