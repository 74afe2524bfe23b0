"""The overhead benchmark's presets and the stage names replies and worker metrics carry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["INSTANT_BACKEND", "METRIC_STAGES", "PRESETS", "RESULTS", "TIMING_STAGES", "Preset"]

TIMING_STAGES = ("parse", "embed", "retrieve", "select", "kafka_hop", "handoff", "route", "generate")
METRIC_STAGES = (*TIMING_STAGES, "emit", "total")
INSTANT_BACKEND = (
    "--prefill-ms-per-token", "0", "--decode-ms-per-token", "0", "--batch-slowdown", "0",
    "--max-batch-size", "128", "--max-concurrent-requests", "1024",
)  # fmt: skip
RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass(frozen=True)
class Preset:
    examples: int
    real: int  # rows with a real MiniLM embedding; the rest are perturbed copies
    rate: float  # steady phase, requests/s
    duration_s: float
    saturate: int  # requests in the saturation burst
    baseline_s: float
    micro_iterations: int
    index_timeout_s: float
    saturate_window_s: float = 60.0  # how long the burst's replies are collected
    low_rate: float = 10.0  # a first steady phase at a rate the stack sustains: the latency floor
    low_duration_s: float = 15.0
    max_new_tokens: int = 16


PRESETS = {
    "small": Preset(10_000, 1_000, 50.0, 30.0, 1_500, 10.0, 3_000, 120.0),
    "full": Preset(100_000, 2_000, 50.0, 45.0, 3_000, 15.0, 10_000, 300.0, 60.0),
}
