"""Measured quality per serving condition (``bench/results/quality-cells.json``) for the fleet, with
its uncertainty carried into every number the fleet prints.

The file is the quality measurement's (``bench.quality_eval``, schema ``echolm.quality-cells.v1``):
per measured condition, ``n``, each metric's ``{mean, ci_low, ci_high}`` and ``vs_large`` (paired
against the large model alone: ``win_rate`` and ``win_ci``). The fleet measures which condition each
request was served under; this module maps those conditions onto the measured cells:

==================  ===================  ====================================================
fleet condition     measured cell        why
==================  ===================  ====================================================
large               large                the large model alone (win rate 0.5 by definition)
large_examples      large_two_stage      the large model shown echolm's examples
small_alone         small                the small model alone
small_match         small_two_stage      the small model shown echolm's examples; the
small_related       small_two_stage      measurement does not split by whether a rewording
                                         was among them, so both take the same cell
cache_match         semantic_cache       a semantic-cache hit (a neighbour's stored answer)
cache_other         semantic_cache
failed              (none)               0: a failed request loses; no uncertainty
==================  ===================  ====================================================

A system's quality is ``Q = sum_c p_c q_c`` over the conditions' shares ``p_c`` in the run. Its 95%
interval carries both sources of uncertainty, as a normal approximation: each cell's (half-width of
its 95% CI / 1.96, squared, times ``p_c^2``) and the run's own sampling of conditions
(``sum_c p_c (q_c - Q)^2 / n``).

``PLACEHOLDER`` is a stand-in with the schema's shape for smoke tests only: every number it yields
is labelled ``PLACEHOLDER`` and must never reach a headline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.calibrate import QualityModel

__all__ = [
    "CELLS_PATH",
    "CELL_OF",
    "PAPER_SMALL_MATCH",
    "PLACEHOLDER",
    "Cell",
    "QualityCells",
    "Scored",
]

CELLS_PATH = Path(__file__).resolve().parent / "results" / "quality-cells.json"
PAPER_SMALL_MATCH = 0.56  # EchoLM paper, Gemma-2-2B with examples vs Gemma-2-27B, MS MARCO: a sensitivity row
CELL_OF: dict[str, str | None] = {
    "large": "large",
    "large_examples": "large_two_stage",
    "small_alone": "small",
    "small_match": "small_two_stage",
    "small_related": "small_two_stage",
    "cache_match": "semantic_cache",
    "cache_other": "semantic_cache",
    "failed": None,
}
Z95 = 1.959964


@dataclass(frozen=True, slots=True)
class Cell:
    """One measured condition: win rate against the large model alone, with its 95% CI and n."""

    name: str
    win_rate: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def se(self) -> float:
        return (self.ci_high - self.ci_low) / (2 * Z95)


@dataclass(frozen=True, slots=True)
class Scored:
    """A system's quality: the point estimate, its 95% interval, and where it came from."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class QualityCells:
    cells: Mapping[str, Cell]
    source: str  # where the numbers came from; "PLACEHOLDER ..." for the stand-in

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str) -> QualityCells:
        if data.get("schema") != "echolm.quality-cells.v1":
            raise ValueError(f"{source}: expected schema echolm.quality-cells.v1, got {data.get('schema')!r}")
        cells: dict[str, Cell] = {}
        for name, cell in data["cells"].items():
            n = int(cell["n"])
            if name == "large":
                cells[name] = Cell(name, 0.5, 0.5, 0.5, n)
                continue
            vs = cell.get("vs_large")
            if not vs:
                continue
            low, high = (float(x) for x in vs["win_ci"])
            cells[name] = Cell(name, float(vs["win_rate"]), low, high, int(vs["n"]))
        missing = {c for c in CELL_OF.values() if c is not None} - set(cells) - {"large_two_stage"}
        if missing:
            raise ValueError(f"{source}: no measured cell for {sorted(missing)}; the fleet needs every one")
        return cls(cells, source)

    @classmethod
    def load(cls, path: Path = CELLS_PATH) -> QualityCells:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run the quality measurement (python -m bench.quality_eval report "
                "--update-benchmarks), or pass --quality placeholder for a smoke test (never a headline)"
            )
        return cls.from_json(json.loads(path.read_text()), source=f"measured: {path.name}")

    def cell(self, condition: str) -> Cell | None:
        if condition not in CELL_OF:
            raise ValueError(f"unknown serving condition {condition!r}; known: {sorted(CELL_OF)}")
        name = CELL_OF[condition]
        if name is None:
            return None
        if name not in self.cells and condition == "large_examples":
            name = "large"  # not measured: the large model alone stands in
        return self.cells[name]

    def as_quality_model(self) -> QualityModel:
        """The cells' point estimates as the fleet's per-request ``QualityModel`` (routing priors and
        each record's ``quality``); every interval comes from ``score``, not from this."""
        from bench.calibrate import QualityModel

        def win(condition: str) -> float:
            cell = self.cell(condition)
            return 0.0 if cell is None else min(max(cell.win_rate, 0.0), 1.0)

        names = ("small_alone", "small_match", "small_related", "cache_match", "cache_other")
        return QualityModel(
            **{n: win(n) for n in names},
            sources={n: f"{self.source}: cell {CELL_OF[n]}" for n in names},
        )

    def with_small_match(self, win_rate: float, label: str) -> QualityCells:
        """The sensitivity row: the small-with-examples cell replaced by an exact ``win_rate``."""
        cells = dict(self.cells)
        cells["small_two_stage"] = Cell("small_two_stage", win_rate, win_rate, win_rate, 0)
        return QualityCells(cells, f"{self.source}; small_two_stage = {win_rate:g} ({label})")

    def score(self, counts: Mapping[str, int]) -> Scored:
        """Quality of a system whose requests were served ``counts[condition]`` times each."""
        n = sum(counts.values())
        if n == 0:
            return Scored(math.nan, math.nan, math.nan, 0, self.source)
        parts = []
        for condition, k in counts.items():
            cell = self.cell(condition)
            parts.append((k / n, 0.0 if cell is None else cell.win_rate, 0.0 if cell is None else cell.se))
        mean = sum(p * q for p, q, _ in parts)
        var = sum((p * se) ** 2 for p, _, se in parts) + sum(p * (q - mean) ** 2 for p, q, _ in parts) / n
        half = Z95 * math.sqrt(var)
        return Scored(mean, mean - half, mean + half, n, self.source)


PLACEHOLDER = QualityCells(
    {
        "large": Cell("large", 0.5, 0.5, 0.5, 0),
        "small": Cell("small", 0.35, 0.30, 0.40, 0),
        "small_two_stage": Cell("small_two_stage", 0.45, 0.40, 0.50, 0),
        "semantic_cache": Cell("semantic_cache", 0.30, 0.25, 0.35, 0),
    },
    "PLACEHOLDER: made-up cells for smoke tests, not a measurement",
)
