"""Tables and plots of a virtual fleet sweep (``bench.fleet.vsweep run``'s JSON).

    python -m bench.fleet.vsweep_report bench/results/fleet-vsweep.json [--tune ...] [--plots]

Markdown to stdout: capacity at the SLO per system and pattern (with quality there), then per
pattern every (system, load): p50 / p99 (median over repetitions, and the p99's range), refusals,
throughput, offload and the win rate against the large model alone with its 95% interval. Plots
(``docs/plots/fleet-vsweep-*.png``): quality against throughput with CIs, latency CDFs per load,
offload over time.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.fleet.vsweep import SYSTEMS

__all__ = ["markdown", "plots"]

PLOTS = Path(__file__).resolve().parents[2] / "docs" / "plots"


def _s(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _cap(value: float | None, nominal: float) -> str:
    if value is None:
        return "below the lightest load"
    return f"{value:.0f} ({value / nominal:.2f}x)"


def markdown(run: Mapping[str, Any], tune: Mapping[str, Any] | None = None) -> str:
    nominal = float(run["large_only_nominal_rps"])
    med = run["medians"]
    systems = [s for s in SYSTEMS if any(m["system"] == s for m in med)]
    loads = sorted({m["load"] for m in med})
    lines = [
        f"SLOs: tight p99 <= {run['slo_s']:.2f} s (3x large-only's p50 at {min(loads):g}x, steady), loose "
        f"p99 <= {run['slo_loose_s']:.2f} s (2x its p99 there). "
        f"Large-only nominal capacity {nominal:.0f} req/s; loads {', '.join(f'{x:g}' for x in loads)}x; "
        f"{run['sweep']['reps']} repetitions of {run['sweep']['window_s']:g} s of arrivals per point; "
        f"prefill {run['sweep']['prefill']}, max_batch_prefill_tokens {run['sweep']['prefill_tokens']}; "
        f"load term of `echolm`: {run['load_term']} ({run['load_term_source']}).",
        "",
        "| system | capacity, tight SLO: steady (req/s) | bursty | loose SLO: steady | bursty "
        "| win rate at 1x, steady (95% CI) | with the paper's 0.56 (sensitivity) | offload at 1x |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    caps, loose = run["capacity_at_slo_rps"], run["capacity_at_loose_slo_rps"]
    at1 = {m["system"]: m for m in med if m["pattern"] == "steady" and m["load"] == 1.0}
    for system in systems:
        q = at1.get(system, {}).get("quality", {})
        off = at1.get(system, {}).get("offload", math.nan)
        paper = at1.get(system, {}).get("quality_paper_small_match", {}).get("mean", math.nan)
        lines.append(
            f"| {system} | {_cap(caps['steady'].get(system), nominal)} "
            f"| {_cap(caps['bursty'].get(system), nominal)} "
            f"| {_cap(loose['steady'].get(system), nominal)} | {_cap(loose['bursty'].get(system), nominal)} "
            f"| {q.get('mean', math.nan):.3f} ({q.get('ci_low', math.nan):.3f}-"
            f"{q.get('ci_high', math.nan):.3f}) | {paper:.3f} | {off:.0%} |"
        )
    for pattern in ("steady", "bursty"):
        lines += [
            "",
            f"**{pattern}**",
            "",
            "| system | load | p50 / p99 (s) | p99 range | refused | throughput (req/s) | offload "
            "| win rate (95% CI) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for system in systems:
            for m in sorted(
                (m for m in med if m["system"] == system and m["pattern"] == pattern), key=lambda m: m["load"]
            ):
                q = m["quality"]
                lo, hi = m["p99_range_s"]
                lines.append(
                    f"| {system} | {m['load']:g}x ({m['rate_rps']:.0f}) "
                    f"| {_s(m['p50_s'])} / {_s(m['p99_s'])} | "
                    f"{_s(lo)}-{_s(hi)} | {m['refused']} of {m['n']} | {m['throughput_rps']:.0f} | "
                    f"{m['offload']:.0%} | {q['mean']:.3f} ({q['ci_low']:.3f}-{q['ci_high']:.3f}) |"
                )
    if tune is not None:
        best, defaults = tune["best"], tune.get("defaults")
        lines += [
            "",
            f"Load term tuned on workload seed {tune['workload_seed']} ({len(tune['grid'])} settings, "
            f"one repetition, both patterns): best {best['term']}, mean capacity "
            f"{best['capacity_mean_rps']:.0f} req/s, worst quality at points meeting the SLO "
            f"{best['worst_quality']:.3f}"
            + (
                f"; shipped defaults {defaults['capacity_mean_rps']:.0f} req/s, "
                f"{defaults['worst_quality']:.3f}"
                if defaults
                else ""
            )
            + f"; load-blind {tune['load_blind_capacities']}.",
        ]
    return "\n".join(lines)


def plots(run: Mapping[str, Any], tag: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    med, rows = run["medians"], run["rows"]
    systems = [s for s in SYSTEMS if any(m["system"] == s for m in med)]
    loads = sorted({m["load"] for m in med})
    written = []
    for pattern in ("steady", "bursty"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system in systems:
            pts = sorted(
                (m for m in med if m["system"] == system and m["pattern"] == pattern), key=lambda m: m["load"]
            )
            qs = [m["quality"] for m in pts]
            ax.errorbar(
                [m["throughput_rps"] for m in pts],
                [q["mean"] for q in qs],
                yerr=[[q["mean"] - q["ci_low"] for q in qs], [q["ci_high"] - q["mean"] for q in qs]],
                fmt="o-",
                capsize=3,
                label=system,
            )
        ax.set(
            xlabel="throughput (req/s)",
            ylabel="win rate vs large alone (95% CI)",
            title=f"quality vs throughput, {pattern}",
        )
        ax.legend(fontsize=7)
        path = PLOTS / f"fleet-vsweep{tag}-quality-vs-throughput-{pattern}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
        fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 3.2), sharey=True, squeeze=False)
        for ax, load in zip(axes[0], loads, strict=True):
            for system in systems:
                r = next(
                    (
                        r
                        for r in rows
                        if r["system"] == system
                        and r["pattern"] == pattern
                        and r["load"] == load
                        and r["rep"] == 0
                    ),
                    None,
                )
                if r:
                    xs = [x if math.isfinite(x) else float("nan") for x in r["latency_quantiles_s"]]
                    ax.plot(xs, [q / 100 for q in range(0, 101, 5)], label=system)
            ax.set(title=f"{load:g}x", xlabel="latency (s)")
        axes[0][0].set_ylabel("CDF (repetition 0)")
        axes[0][-1].legend(fontsize=6)
        path = PLOTS / f"fleet-vsweep{tag}-latency-cdf-{pattern}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for system in (s for s in systems if s.startswith("echolm")):
        for load in (1.0, 1.5):
            r = next(
                (
                    r
                    for r in rows
                    if r["system"] == system
                    and r["pattern"] == "bursty"
                    and r["load"] == load
                    and r["rep"] == 0
                ),
                None,
            )
            if r:
                ax.plot(
                    [5 * i for i in range(len(r["offload_by_5s"]))],
                    r["offload_by_5s"],
                    label=f"{system} {load:g}x",
                )
    ax.set(
        xlabel="seconds since the first arrival",
        ylabel="offload (small tier) per 5 s",
        title="offload over time, bursty",
    )
    ax.legend(fontsize=7)
    path = PLOTS / f"fleet-vsweep{tag}-offload-over-time.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--tune", type=Path)
    parser.add_argument("--plots", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the plot names (e.g. -masked)")
    args = parser.parse_args(argv)
    run = json.loads(args.run.read_text())
    tune = json.loads(args.tune.read_text()) if args.tune else None
    print(markdown(run, tune))
    if args.plots:
        for path in plots(run, args.tag):
            print(f"<!-- plot: {path.name} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
