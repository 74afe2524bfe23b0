"""The fleet benchmark's presets, the systems it compares and the tier names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["FLEET_COST_WEIGHT", "LARGE", "PLOTS_DIR", "PRESETS", "SMALL", "SYSTEMS", "TENANT", "FleetPreset"]

PLOTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "plots"
SYSTEMS = ("large-only", "small-only", "semantic-cache", "echolm-load-blind", "echolm")
TENANT = "bench"
SMALL, LARGE = "small", "large"
FLEET_COST_WEIGHT = 0.05  # routing.cost_weight on the fleet's win-rate quality scale


@dataclass(frozen=True, slots=True)
class FleetPreset:
    name: str
    small_model: str = "1B"
    large_model: str = "8B"
    slots: int = 4  # emulated GPUs per system
    echolm_small: int = 2  # of which small-tier replicas for echolm and the load-blind router
    max_batch_size: int = 8  # sequences a replica runs at once (continuous batching)
    time_scale: float = 4.0  # emulated service times x this (1 = the H100 measurements)
    groups: int = 120  # contradish paraphrase groups in the workload
    bank_fraction: float = 0.5
    novel_group_fraction: float = 0.3  # groups with no entry in the bank: requests no cache can help
    zipf_s: float = 0.8
    burst_requests: int = 300
    burst_rate_rps: float = 8.0
    burst_peak: float = 2.5
    burst_fraction: float = 0.25
    burst_mean_s: float = 4.0
    saturation_requests: int = 120
    saturation_window_s: float = 2.0
    tokens_median: int = 160
    tokens_sigma: float = 0.5
    semantic_threshold: float = 0.8
    # Share of echolm replies rated back (Bernoulli(win rate) thumbs). 0: the router keeps its priors,
    # which makes runs repeatable; with 0.2, two runs routed very differently (docs/benchmarks.md).
    feedback_rate: float = 0.0
    worker_concurrency: int = 128
    drain_timeout_s: float = 120.0
    timeline_bin_s: float = 5.0
    systems: tuple[str, ...] = SYSTEMS
    seed: int = 0
    training_groups: int = 100  # other groups, for the offline-trained utility model (train_utility)
    # routing.load_q0; None keeps the default (2 waiting requests, routing.load_signal = "waiting").
    # Earlier runs set 8 when the penalty read waiting + running (docs/benchmarks.md).
    load_q0: float | None = None
    trained_utility: bool = True  # False: the untrained default utility model and threshold
    # "assumed": PRIMARY_QUALITY (calibrate.ASSUMED_QUALITY with the paper's measured small_match);
    # "offline": bench/selection_quality.py's SmolLM2-vs-its-best-of-n measurement. The other one is
    # always reported as a what-if, and report.quality_sensitivity re-scores small_match.
    quality_source: str = "assumed"

    @property
    def echolm_large(self) -> int:
        return self.slots - self.echolm_small


PRESETS: dict[str, FleetPreset] = {
    "small": FleetPreset(name="small"),
    # A two-minute shake-out of the whole path (not for quoting).
    "smoke": FleetPreset(
        name="smoke", groups=30, burst_requests=60, saturation_requests=40, drain_timeout_s=60
    ),
    # About 35 minutes: four times the stream, every group. Run it where it may take the machine.
    "full": FleetPreset(name="full", groups=400, burst_requests=1200, saturation_requests=400),
}
