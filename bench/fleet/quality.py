"""Quality, modelled: the table the fleet scores with, and the condition each echolm reply was served under.

The conditions are measured per request; the table is a model (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from bench.calibrate import (
    ASSUMED_QUALITY,
    RESULTS_DIR,
    Condition,
    QualityModel,
    quality_model_from_selection,
)

__all__ = ["PRIMARY_QUALITY", "condition_of", "offline_quality_model"]

# The table the fleet scores with: the assumed, paper-shaped cells, except ``small_match``, which is the
# paper's own measured number (Gemma-2-2B shown examples against Gemma-2-27B on MS MARCO: win rate 0.56;
# /work/shared/ECHOLM.md). Still a model: the conditions are measured, the table is not.
PRIMARY_QUALITY = replace(
    ASSUMED_QUALITY,
    small_match=0.56,
    sources={
        **ASSUMED_QUALITY.sources,
        "small_match": "PAPER: small model with examples vs a ~10x larger one, MS MARCO (win rate 0.56)",
    },
)


def condition_of(
    *, tier: str, large_tier: str, example_ids: Sequence[str], group_of: Mapping[str, str], group: str
) -> Condition:
    """The quality condition of one echolm reply: the tier, and whether a rewording of the request
    (same paraphrase group) was among the examples the small tier was shown."""
    if tier == large_tier:
        return "large"
    if not example_ids:
        return "small_alone"
    if any(group_of.get(e) == group for e in example_ids):
        return "small_match"
    return "small_related"


def offline_quality_model(fallback: QualityModel, results_dir: Path = RESULTS_DIR) -> QualityModel:
    """The offline-measured table (``calibrate.load_quality_model``'s files), its thin cells filled from
    ``fallback`` (the primary table) rather than from ``ASSUMED_QUALITY``; ``fallback`` if none exists."""
    for name in ("selection-quality-full.json", "selection-quality-small.json"):
        path = results_dir / name
        if path.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                model, _ = quality_model_from_selection(
                    json.loads(path.read_text()), name=path.name, fallback=fallback
                )
                return model
    return fallback
