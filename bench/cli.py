"""``echolm bench``: the benchmarks behind BENCHMARKS.md.

    echolm bench fleet-sweep run --load-term bench/results/fleet-vsweep-tune.json --out OUT.json
    echolm bench fleet --preset small      # the superseded issue-4 fleet (history)
                                           # router on one stream; about 12 min on 2 cores
    echolm bench report --preset small     # plots (docs/plots) + BENCHMARKS.md sections from the result
    echolm bench calibrate                 # dev-server + emulator measurements -> calibration.json
    echolm bench gpu-calibrate --out F     # on a GPU machine: 1B/3B/8B prefill and decode timings
    echolm bench quality [--update-benchmarks]   # measured quality from bench/results/quality (issue 8)
    echolm bench all [--dry-run]           # every benchmark behind BENCHMARKS.md in turn (about 75 min)

Results land in bench/results/ (JSON) and docs/plots/ (PNG); docs/benchmarks.md explains each one.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cmd_fleet(args: argparse.Namespace) -> int:
    from bench.fleet import PRESETS, SYSTEMS, run_fleet
    from bench.report import markdown_tables

    preset = PRESETS[args.preset]
    overrides: dict[str, Any] = {}
    if args.systems:
        unknown = set(args.systems) - set(SYSTEMS)
        if unknown:
            print(f"error: unknown systems {sorted(unknown)}; choose from {SYSTEMS}", file=sys.stderr)
            return 2
        overrides["systems"] = tuple(args.systems)
    names = ("time_scale", "slots", "echolm_small", "max_batch_size", "seed", "burst_rate_rps")
    for name in (*names, "quality_source", "feedback_rate"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    preset = replace(preset, **overrides)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"fleet-{preset.name}.json"
    with tempfile.TemporaryDirectory(prefix="echolm-fleet-") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
        result = asyncio.run(
            run_fleet(
                preset, out=out, data_dir=data_dir, say=_say, command="echolm bench " + shlex.join(args.argv)
            )
        )
    print(markdown_tables(result))
    _say(f"wrote {out} and {len(result.get('plots', []))} plots in {result['wall_s']:.0f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import (
        load_result,
        markdown_tables,
        quality_sensitivity,
        render_plots,
        update_benchmarks,
    )

    path = Path(args.result) if args.result else ROOT / "bench" / "results" / f"fleet-{args.preset}.json"
    if not path.is_file():
        print(
            f"error: {path} does not exist; run `echolm bench fleet --preset {args.preset}` first",
            file=sys.stderr,
        )
        return 2
    result, records = load_result(path)
    notes = path.with_name(path.stem + "-notes.md")
    if notes.is_file():  # the hand-written reading of this run, kept beside it
        result["notes"] = notes.read_text()
    if records:  # re-scored from the records, so the table follows the current code and quality table
        table = {c: float(v["win_rate"]) for c, v in result["quality_model"].items()}
        result["quality_sensitivity"] = quality_sensitivity(records, table)
    plots = render_plots(result, records, Path(args.plots)) if records else []
    if not records:
        _say(f"no per-request records next to {path}: tables only, no plots")
    print(markdown_tables(result))
    if args.update_benchmarks:
        calibration = ROOT / "bench" / "results" / "calibration.json"
        update_benchmarks(ROOT / "BENCHMARKS.md", result, calibration if calibration.is_file() else None)
        _say("updated the baselines and calibration sections of BENCHMARKS.md")
    _say(f"{len(plots)} plots in {args.plots}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from bench.calibrate import CALIBRATION_JSON, run_calibration

    out = Path(args.out) if args.out else CALIBRATION_JSON
    with tempfile.TemporaryDirectory(prefix="echolm-calibrate-") as tmp:
        result = asyncio.run(
            run_calibration(out=out, dev_server=not args.skip_dev_server, log_dir=Path(tmp), progress=_say)
        )
    print(
        "| tier | source | prefill ms/token | decode ms/token | batch slowdown | emulator: prefill | decode |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, tier in result["tiers"].items():
        check = result["emulator_check"].get(name, {})
        print(
            f"| {name} | {tier['source']} | {tier['prefill_ms_per_token']:.4f} "
            f"| {tier['decode_ms_per_token']:.3f} "
            f"| {tier['batch_slowdown']:.4f} | {check.get('prefill_ms_per_token', float('nan')):.4f} "
            f"| {check.get('decode_ms_per_token', float('nan')):.3f} |"
        )
    _say(f"wrote {out}")
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from bench.quality_eval.report import main as quality_main

    return quality_main(update=args.update_benchmarks)


def cmd_fleet_sweep(args: argparse.Namespace) -> int:
    from bench.fleet.vsweep import main as vsweep_main

    return vsweep_main(args.rest)


def cmd_gpu_calibrate(args: argparse.Namespace) -> int:
    from bench.gpu_calibrate import main as gpu_main

    return gpu_main(args.rest)


def all_commands(preset: str) -> list[list[str]]:
    """Every benchmark behind BENCHMARKS.md's headline numbers, in the order ``echolm bench all`` runs
    them, with the options BENCHMARKS.md quotes (about 90 min on 2 cores in all, the 25-minute soak
    included). ``preset`` picks selection-quality's and the fleet's preset."""
    py = sys.executable
    return [
        [py, "-m", "bench.stack_timings"],
        [py, "-m", "bench.tgi_dev_latency"],
        [py, "-m", "bench.embed_speed"],
        [py, "-m", "bench.overhead", "--preset", "full", "--output", "bench/results/overhead-full-v2.json"],
        [py, "-m", "bench.selection_quality", "--preset", preset],
        [py, "-m", "bench.cli", "calibrate"],
        # the fleet headline (issue 12): decisions of both workload seeds, the load term tuned on seed 1
        [py, "-m", "bench.fleet.decisions", "--seed", "0", "--out", "bench/results/fleet-decisions.json.gz"],
        [
            py,
            "-m",
            "bench.fleet.decisions",
            "--seed",
            "1",
            "--out",
            "bench/results/fleet-decisions-seed1.json.gz",
        ],
        [
            py,
            "-m",
            "bench.fleet.vsweep",
            "tune",
            "--decisions",
            "bench/results/fleet-decisions-seed1.json.gz",
            "--reps",
            "1",
            "--out",
            "bench/results/fleet-vsweep-tune.json",
        ],
        [
            py,
            "-m",
            "bench.fleet.vsweep",
            "run",
            "--load-term",
            "bench/results/fleet-vsweep-tune.json",
            "--out",
            "bench/results/fleet-vsweep.json",
        ],
        [
            py,
            "-m",
            "bench.fleet.vsweep_report",
            "bench/results/fleet-vsweep.json",
            "--tune",
            "bench/results/fleet-vsweep-tune.json",
            "--plots",
        ],
        [
            py,
            "-m",
            "bench.soak",
            "--steady-s",
            "1500",
            "--set",
            "routing.feedback_window=5000",
            "--out",
            "bench/results/soak-25min.json",
        ],
    ]


def cmd_all(args: argparse.Namespace) -> int:
    import subprocess

    from tqdm import tqdm

    commands = all_commands(args.preset)
    if args.dry_run:
        for command in commands:
            print(shlex.join(["python", *command[1:]]))
        return 0
    failed: list[str] = []
    for command in tqdm(commands, desc="benchmarks", unit="bench"):
        line = shlex.join(["python", *command[1:]])
        _say(f"running: {line}")
        if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
            failed.append(line)
            _say(f"FAILED: {line} (the others still run)")
    if failed:
        _say("failed: " + "; ".join(failed))
        return 1
    _say("every benchmark ran; results in bench/results/, plots in docs/plots/")
    return 0


# Sub-commands with parsers of their own: every argument after the name is theirs.
PASSTHROUGH: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "fleet-sweep": (
        cmd_fleet_sweep,
        "the fleet on a virtual clock: tune | run (python -m bench.fleet.vsweep)",
    ),
    "gpu-calibrate": (cmd_gpu_calibrate, "time 1B/3B/8B decoders on a GPU (python -m bench.gpu_calibrate)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echolm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")

    p = sub.add_parser("fleet", help="echolm against its baselines on emulated GPU replicas (same stream)")
    p.add_argument(
        "--preset",
        choices=["smoke", "small", "full"],
        default="small",
        help="small: about 12 min on 2 cores; full: longer streams (docs/benchmarks.md)",
    )
    p.add_argument("--systems", nargs="+", help="run only these systems (default: all five)")
    p.add_argument("--time-scale", type=float, help="multiply emulated service times (1 = H100)")
    p.add_argument("--slots", type=int, help="emulated GPUs per system")
    p.add_argument("--echolm-small", type=int, help="of the slots, small-tier replicas for echolm")
    p.add_argument("--max-batch-size", type=int, help="sequences one emulated replica runs at once")
    p.add_argument("--burst-rate-rps", type=float, help="mean arrival rate of the burst phase")
    p.add_argument("--seed", type=int)
    p.add_argument("--feedback-rate", type=float, help="share of echolm replies rated back (default 0)")
    p.add_argument(
        "--quality-source",
        choices=["assumed", "offline"],
        help="which quality table routes and scores (default assumed: the paper's small_match 0.56, other "
        "cells assumed; the other is reported as a what-if)",
    )
    p.add_argument("--out", help="result JSON (default bench/results/fleet-<preset>.json)")
    p.add_argument("--data-dir", help="keep the stack's data and logs here (default: a temporary folder)")
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("report", help="plots and tables from a fleet result; optionally update BENCHMARKS.md")
    p.add_argument("--preset", choices=["smoke", "small", "full"], default="small")
    p.add_argument("--result", help="fleet result JSON (default bench/results/fleet-<preset>.json)")
    p.add_argument("--plots", default=str(ROOT / "docs" / "plots"), help="where the PNGs go")
    p.add_argument(
        "--update-benchmarks",
        action="store_true",
        help="rewrite BENCHMARKS.md's baselines and calibration sections (between their markers)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "calibrate", help="measure the dev server and check the emulator; write calibration.json"
    )
    p.add_argument("--skip-dev-server", action="store_true", help="GPU tiers and emulator check only")
    p.add_argument("--out", help="default bench/results/calibration.json")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("all", help="every benchmark behind BENCHMARKS.md, one after another (about 90 min)")
    p.add_argument("--preset", choices=["small", "full"], default="small", help="preset where one exists")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    p.set_defaults(func=cmd_all)

    p = sub.add_parser(
        "quality", help="measured-quality tables from the generation cache (bench/quality_eval)"
    )
    p.add_argument(
        "--update-benchmarks", action="store_true", help="write quality-cells.json and BENCHMARKS.md"
    )
    p.set_defaults(func=cmd_quality)

    for name, (func, text) in PASSTHROUGH.items():  # listed here; ``main`` hands them their arguments
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # their own parsers, --help included
        return int(PASSTHROUGH[argv[0]][0](argparse.Namespace(rest=argv[1:])))
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
