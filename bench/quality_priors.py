"""Measured cells -> the router's priors file (``agents/policy/priors.json``).

    python -m bench.quality_priors [bench/results/quality-cells.json] [--out agents/policy/priors.json]

Reads the ``echolm.quality-cells.v1`` file that ``python -m bench.quality_eval report
--update-benchmarks`` writes and puts each tier's quality on the router's scale: the win rate
against the large model alone (ties half, the report's tie margin), so ``large.alone`` is 0.5.
``with_examples`` is the tier's two-stage cell de-diluted by the share of requests that were shown
any example (``by_bin``): a request without examples sends the same prompt as the tier alone, so
``cell(two_stage) - cell(alone) = share * gain on the requests shown examples``. The runtime reads
only the written file (``agents.priors``); it never imports bench.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["priors_from_cells"]

ROOT = Path(__file__).resolve().parents[1]
CELLS = {"small": ("small", "small_two_stage"), "large": ("large", "large_two_stage")}


def _win(cells: Mapping[str, Any], name: str) -> float:
    if name == "large":
        return 0.5  # the large tier against itself
    row = cells.get(name, {}).get("vs_large")
    if not row or "win_rate" not in row:
        raise ValueError(f"cell {name!r} has no vs_large win rate; run the quality report first")
    return float(row["win_rate"])


def _clip(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def priors_from_cells(data: Mapping[str, Any]) -> dict[str, Any]:
    """The priors file (schema ``echolm.router-priors.v1``) for a parsed cells file."""
    if data.get("schema") != "echolm.quality-cells.v1":
        raise ValueError(f"expected schema 'echolm.quality-cells.v1', got {data.get('schema')!r}")
    cells = data["cells"]
    bins = data.get("by_bin", {}).values()
    shown = sum(int(b.get("two_stage_with_examples", 0)) for b in bins)
    total = sum(int(b.get("n_large", 0)) for b in bins)
    share = shown / total if total and shown else 1.0
    tiers = {}
    for tier, (alone_cell, examples_cell) in CELLS.items():
        alone, mixed = _win(cells, alone_cell), _win(cells, examples_cell)
        tiers[tier] = {
            "alone": _clip(alone),
            "with_examples": _clip(alone + (mixed - alone) / share),
            "cells": [alone_cell, examples_cell],
            "n": [cells.get(c, {}).get("n", 0) for c in (alone_cell, examples_cell)],
        }
    return {
        "schema": "echolm.router-priors.v1",
        "measured": True,
        "source": f"bench/results/quality-cells.json generated {data.get('generated_at', '?')}",
        "scale": "win rate against the large model alone (ties half; large alone = 0.5)",
        "models": data.get("models", {}),
        "examples_share": share,
        "tiers": tiers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_priors")
    parser.add_argument("cells", nargs="?", type=Path, default=ROOT / "bench/results/quality-cells.json")
    parser.add_argument("--out", type=Path, default=ROOT / "agents/policy/priors.json")
    args = parser.parse_args(argv)
    if not args.cells.is_file():
        print(f"error: {args.cells} does not exist; run the quality benchmark's report", file=sys.stderr)
        return 2
    priors = priors_from_cells(json.loads(args.cells.read_text(encoding="utf-8")))
    args.out.write_text(json.dumps(priors, indent=1) + "\n", encoding="utf-8")
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{t} {v['alone']:.3f}/{v['with_examples']:.3f}" for t, v in priors["tiers"].items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
