"""Utility-model training from measured helpfulness: did the examples raise the small model's score?

    python -m bench.utility_labels ROWS.jsonl --out .echolm/utility-model.json

Each row is one live request of the quality run, for one condition that showed examples::

    {"score_alone": 0.61, "score_with": 0.68, "features": [[...candidate_features...], ...]}

``score_alone`` is the small model's answer alone, ``score_with`` its answer with those examples,
both scored against the reference (MiniLM cosine, the report's primary metric). ``example_labels``
gives every shown example the label 1 when the examples raised the score by more than ``margin``
(the report's tie margin, 0.02), else 0, weighted ``1 / examples`` so each generation pair counts
once. The written file is what ``selection.utility_model_path`` loads (``{"model": ..., "threshold": ...}``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.policy.features import FEATURE_NAMES
from agents.policy.utility import UtilityModel

__all__ = ["TIE_MARGIN", "LabelledRows", "example_labels", "train_utility"]

TIE_MARGIN = 0.02


@dataclass(frozen=True)
class LabelledRows:
    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray


def example_labels(rows: Iterable[Mapping[str, Any]], *, margin: float = TIE_MARGIN) -> LabelledRows:
    """One training row per shown example (see the module docstring); rows without examples add none."""
    xs: list[Sequence[float]] = []
    ys: list[float] = []
    ws: list[float] = []
    for row in rows:
        features = row["features"]
        if not features:
            continue
        helped = float(row["score_with"]) - float(row["score_alone"]) > margin
        for f in features:
            if len(f) != len(FEATURE_NAMES):
                raise ValueError(f"an example has {len(f)} features, expected {len(FEATURE_NAMES)}")
            xs.append(f)
            ys.append(1.0 if helped else 0.0)
            ws.append(1.0 / len(features))
    return LabelledRows(
        np.asarray(xs, dtype=np.float64).reshape(-1, len(FEATURE_NAMES)),
        np.asarray(ys, dtype=np.float64),
        np.asarray(ws, dtype=np.float64),
    )


def train_utility(rows: Iterable[Mapping[str, Any]], *, margin: float = TIE_MARGIN) -> UtilityModel:
    labelled = example_labels(rows, margin=margin)
    if len(set(labelled.y.tolist())) < 2:
        raise ValueError("need examples that helped and examples that did not to fit the utility model")
    return UtilityModel.default().fit(labelled.x, labelled.y, labelled.weight)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.utility_labels")
    parser.add_argument("rows", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.rows.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = train_utility(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model.to_dict(), "threshold": args.threshold}) + "\n")
    print(f"wrote {args.out}: trained on {model.trained_rows} example rows from {len(rows)} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
