"""One request as one system served it, and reading a fleet result with its per-request records."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RequestResult", "load_result"]


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request as one system served it. Times are seconds from the phase's start (``t0``)."""

    system: str
    phase: str  # "burst" or "saturation"
    request_id: str
    group_id: str
    arrival_s: float  # scheduled arrival (open loop: latency counts from here, not from the send)
    sent_s: float
    done_s: float | None  # None: no reply before the drain timeout
    ok: bool
    tier: str = ""  # "small", "large", "cache"
    backend: str = ""
    n_examples: int = 0
    condition: str = "failed"
    quality: float = 0.0
    generate_ms: float | None = None  # backend time as the serving path saw it, when known
    stages_ms: dict[str, float] = field(default_factory=dict)  # echolm's per-stage timings of this request

    @property
    def latency_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.arrival_s

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def load_result(path: Path) -> tuple[dict[str, Any], list[RequestResult]]:
    """A fleet result JSON and its per-request records (``records_path`` beside it, if present)."""
    result = json.loads(path.read_text())
    records: list[RequestResult] = []
    raw = result.get("records_path")
    if raw:
        raw_path = (path.parent / raw) if not Path(raw).is_absolute() else Path(raw)
        if raw_path.is_file():
            text = (
                gzip.decompress(raw_path.read_bytes()).decode()
                if raw_path.suffix == ".gz"
                else raw_path.read_text()
            )
            records = [RequestResult.from_dict(json.loads(line)) for line in text.splitlines() if line]
    return result, records
