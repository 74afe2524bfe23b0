"""The router's measured quality priors: read the priors file that ships with the package.

``agents/policy/priors.json`` (written by ``bench/quality_priors.py`` from the measured cells in
``bench/results/quality-cells.json``) holds, per model tier, its quality alone and with examples on
the router's reward scale. ``routing.priors_file`` names another file; ``routing.measured_priors =
false`` ignores it. The runtime never imports ``bench``: the file is the only link to the measurement.

Schema ``echolm.router-priors.v1``::

    {"schema": "echolm.router-priors.v1", "measured": true, "scale": "...", "source": "...",
     "tiers": {"small": {"alone": 0.31, "with_examples": 0.42, ...}, "large": {...}}}

Extra keys (n, confidence intervals, model names) are kept for people and ignored here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agents.policy.bandit import MeasuredPrior
from infra.settings import RoutingSettings

__all__ = ["PRIORS_SCHEMA", "SHIPPED_PRIORS", "load_priors", "parse_priors"]

log = logging.getLogger(__name__)

PRIORS_SCHEMA = "echolm.router-priors.v1"
SHIPPED_PRIORS = Path(__file__).resolve().parent / "policy" / "priors.json"


def _unit(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}")
    return float(value)


def parse_priors(data: Any, *, source: str = "priors") -> dict[str, MeasuredPrior]:
    """The per-tier priors of a parsed priors file; a ``ValueError`` names what is wrong and where."""
    if not isinstance(data, dict) or data.get("schema") != PRIORS_SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source}: expected schema {PRIORS_SCHEMA!r}, got {got!r}")
    tiers = data.get("tiers")
    if not isinstance(tiers, dict) or not tiers:
        raise ValueError(f"{source}: 'tiers' must map tier names to {{alone, with_examples}}")
    out: dict[str, MeasuredPrior] = {}
    for tier, row in tiers.items():
        if not isinstance(row, dict):
            raise ValueError(f"{source}: tiers.{tier} must be an object with alone and with_examples")  # noqa: TRY004
        out[str(tier)] = MeasuredPrior(
            alone=_unit(row.get("alone"), f"{source}: tiers.{tier}.alone"),
            with_examples=_unit(row.get("with_examples"), f"{source}: tiers.{tier}.with_examples"),
        )
    return out


def load_priors(routing: RoutingSettings) -> dict[str, MeasuredPrior]:
    """The priors ``routing`` asks for: {} when ``measured_priors`` is off, else the file's tiers.

    A missing or malformed file named in the settings raises; the shipped file always exists."""
    if not routing.measured_priors:
        return {}
    path = routing.priors_file or SHIPPED_PRIORS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"routing.priors_file={str(path)!r} does not exist; write it with bench/quality_priors.py, "
            "point routing.priors_file at another file, or set routing.measured_priors=false"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); regenerate it with bench/quality_priors.py") from None
    priors = parse_priors(data, source=str(path))
    if not data.get("measured", False):
        log.warning("router priors in %s are not measured (%s)", path, data.get("source", "no source given"))
    return priors
