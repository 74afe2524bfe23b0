"""The workload turned into what every system gets: bank rows with stand-in answers, and one seeded
schedule per phase (burst, saturation) with per-request answer lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bench.baselines import Scheduled
from bench.fleet.preset import TENANT, FleetPreset

__all__ = ["Workbench", "bank_answer", "build_workbench", "token_lengths"]


def token_lengths(
    n: int, *, median: int, sigma: float, seed: int, low: int = 16, high: int = 512
) -> list[int]:
    """Seeded log-normal answer lengths (``max_new_tokens`` per request), the same for every system."""
    rng = np.random.default_rng([seed, 7])
    values = np.exp(rng.normal(math.log(median), sigma, size=n))
    return [int(v) for v in np.clip(np.round(values), low, high)]


def bank_answer(text: str, tokens: int) -> str:
    """A stand-in large-model answer of about ``tokens`` tokens (4 characters each, as the emulator
    counts them)."""
    head = f"Answer to: {text.strip()} "
    body = " the answer to this request takes some words" * (tokens * 4 // 44 + 1)
    return (head + body)[: max(len(head), tokens * 4)]


@dataclass
class Workbench:
    """The workload, turned into what every system gets: bank rows, and one schedule per phase."""

    bank: list[tuple[str, str]]
    phases: dict[str, list[Scheduled]]
    group_of: dict[str, str]  # example id -> group, for every text of the workload
    description: dict[str, str] = field(default_factory=dict)
    groups: frozenset[str] = frozenset()


def build_workbench(preset: FleetPreset) -> Workbench:
    from agents.policy.admission import example_id
    from bench.workloads import WorkloadConfig, build_workload, load_contradish_groups, sample_groups

    groups = load_contradish_groups()
    chosen = set(
        sample_groups([g.group_id for g in groups], min(preset.groups, len(groups)), seed=preset.seed)
    )
    groups = [g for g in groups if g.group_id in chosen]
    n = preset.burst_requests + preset.saturation_requests
    config = WorkloadConfig(
        seed=preset.seed,
        n_requests=n,
        rate_rps=preset.burst_rate_rps,
        process="bursty",
        zipf_s=preset.zipf_s,
        bank_fraction=preset.bank_fraction,
        novel_group_fraction=preset.novel_group_fraction,
        burst_peak=preset.burst_peak,
        burst_fraction=preset.burst_fraction,
        burst_mean_s=preset.burst_mean_s,
    )
    workload = build_workload(groups, config)
    tokens = token_lengths(n, median=preset.tokens_median, sigma=preset.tokens_sigma, seed=preset.seed)
    burst = [
        Scheduled(f"burst-{i:05d}", a.request.group_id, a.request.text, a.at, tokens[i])
        for i, a in enumerate(workload.arrivals[: preset.burst_requests])
    ]
    step = preset.saturation_window_s / max(preset.saturation_requests, 1)
    saturation = [
        Scheduled(
            f"sat-{i:05d}", a.request.group_id, a.request.text, i * step, tokens[preset.burst_requests + i]
        )
        for i, a in enumerate(workload.arrivals[preset.burst_requests :])
    ]
    group_of = {example_id(TENANT, t): g.group_id for g in groups for t in g.texts}
    return Workbench(
        groups=frozenset(chosen),
        bank=[(r.text, r.group_id) for r in workload.bank],
        phases={"burst": burst, "saturation": saturation},
        group_of=group_of,
        description={
            "burst": f"{len(burst)} requests, bursty arrivals (mean {preset.burst_rate_rps:g} req/s, peaks "
            f"{preset.burst_peak:g}x for {preset.burst_fraction:.0%} of the time)",
            "saturation": f"the next {len(saturation)} requests of the stream, all sent within "
            f"{preset.saturation_window_s:g} s: completions/s is capacity",
        },
    )
