"""The same records re-scored with other quality tables: the conditions are measured, the table is a model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bench.report.records import RequestResult
from bench.report.summary import requality, sustained_rate
from bench.stats import mean_ci

__all__ = ["SMALL_MATCH_SENSITIVITY", "parity_verdict", "quality_sensitivity"]

# small_match values the sensitivity table re-scores every run with (0.56: the paper's measurement).
SMALL_MATCH_SENSITIVITY = (0.48, 0.50, 0.52, 0.56)


def parity_verdict(ci: Sequence[float], parity: float = 0.5) -> str:
    """``yes`` when the win rate's CI lower bound reaches ``parity``; ``no (CI includes 0.5)`` when
    only its upper bound does; ``no`` otherwise."""
    low, high = float(ci[0]), float(ci[1])
    if low >= parity:
        return "yes"
    return f"no (CI includes {parity:g})" if high >= parity else "no"


def _win_rate(records: Sequence[RequestResult]) -> tuple[float, tuple[float, float]]:
    """Mean quality (failures 0) and its seeded bootstrap CI, as ``summarize`` computes them."""
    return mean_ci([r.quality if r.ok else 0.0 for r in records])


def quality_sensitivity(
    records: Sequence[RequestResult],
    table: Mapping[str, float],
    values: Sequence[float] = SMALL_MATCH_SENSITIVITY,
    *,
    cell: str = "small_match",
    capacity_phase: str = "saturation",
    parity: float = 0.5,
) -> dict[str, Any]:
    """The same records re-scored with ``table`` and ``cell`` set to each of ``values``.

    The conditions are measured and the table is a model, so re-scoring is exact (no re-run): per value,
    each system's win rate and CI per phase, and echolm's parity verdict (``parity_verdict``: CI lower
    bound >= ``parity``). Capacity does not depend on the table (routing never reads it), so echolm's
    gain over large-only (``sustained_rate`` in ``capacity_phase``) is one number for every row.
    A system's win rate is linear in the cell: ``base + share * value``, ``share`` = its requests served
    under ``cell``; ``break_even`` is the value where the point estimate reaches ``parity`` (NaN when
    ``share`` is 0; above 1: not reachable through this cell alone).
    """
    systems = list(dict.fromkeys(r.system for r in records))
    phases = list(dict.fromkeys(r.phase for r in records))
    groups = {
        (s, ph): [r for r in records if r.system == s and r.phase == ph] for s in systems for ph in phases
    }
    groups = {k: v for k, v in groups.items() if v}
    rows = []
    for value in values:
        scored = {**table, cell: float(value)}
        per: dict[str, dict[str, dict[str, Any]]] = {}
        for (system, phase), rs in groups.items():
            q, ci = _win_rate(requality(rs, scored))
            per.setdefault(system, {})[phase] = {"quality": q, "quality_ci": ci, "parity": parity_verdict(ci)}
        rows.append({"value": float(value), "systems": per})
    share: dict[str, dict[str, float]] = {}
    break_even: dict[str, dict[str, float]] = {}
    for (system, phase), rs in groups.items():
        n_cell = sum(1 for r in rs if r.ok and r.condition == cell)
        base = float(
            np.mean([float(table[r.condition]) if r.ok and r.condition != cell else 0.0 for r in rs])
        )
        f = n_cell / len(rs)
        share.setdefault(system, {})[phase] = f
        break_even.setdefault(system, {})[phase] = (parity - base) / f if f > 0 else math.nan
    gain = math.nan
    large = groups.get(("large-only", capacity_phase))
    echolm = groups.get(("echolm", capacity_phase))
    if large and echolm:
        a = sustained_rate([r.done_s for r in echolm if r.ok and r.done_s is not None])
        b = sustained_rate([r.done_s for r in large if r.ok and r.done_s is not None])
        gain = a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan
    return {
        "cell": cell,
        "values": [float(v) for v in values],
        "parity": parity,
        "table": dict(table),
        "rows": rows,
        "share": share,
        "break_even": break_even,
        "echolm_capacity_gain_vs_large": gain,
        "capacity_phase": capacity_phase,
    }
