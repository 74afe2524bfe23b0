"""``python -m bench.overhead``'s flags and ``main``: run, or print ``--compare`` / write ``--plot``."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.overhead.config import PRESETS, RESULTS
from bench.overhead.cpu import wait_quiet
from bench.overhead.output import compare, markdown
from bench.overhead.plot import plot_stages
from bench.overhead.runner import run

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Per-stage pipeline overhead with instant (emulated) backends on the local stack.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--examples", type=int, help="examples in the bank (preset: 10k small, 100k full)")
    p.add_argument("--rate", type=float, help="steady-phase requests/s (preset: 50)")
    p.add_argument("--duration", type=float, help="steady-phase seconds")
    p.add_argument("--low-rate", type=float, help="first steady phase, requests/s for 15 s (0 skips it)")
    p.add_argument("--saturate", type=int, help="requests in the saturation burst")
    p.add_argument("--micro-iterations", type=int)
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="settings override for the stack and worker (JSON value), e.g. embedding.batch_window_s=0.01",
    )  # fmt: skip
    p.add_argument(
        "--fetch-max-wait-ms", type=int, metavar="MS",
        help="alias of --set kafka.fetch_max_wait_ms=MS (1500 reproduces faust's own wait)",
    )  # fmt: skip
    p.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="S",
        help="first wait up to S seconds for other processes to use under half a core (shared machines)",
    )  # fmt: skip
    p.add_argument(
        "--pipeline-only", action="store_true",
        help="skip the micro, embedding, direct-backend and fetch-wait baselines (for A/B runs of settings)",
    )  # fmt: skip
    p.add_argument(
        "--compare", nargs="+", type=Path, metavar="JSON", help="print a table of earlier results; exit"
    )
    p.add_argument("--output", type=Path, help="default: bench/results/overhead-<preset>.json")
    p.add_argument(
        "--plot", nargs="+", type=Path, metavar="JSON", help="plot per-stage overhead of result files; exit"
    )
    p.add_argument(
        "--plot-out",
        type=Path,
        default=RESULTS.parent.parent / "docs" / "plots" / "overhead-stages.png",
        help="PNG for --plot",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the temporary stack folder (logs)")
    p.add_argument(
        "--floors", action="store_true",
        help="measure each component alone first (bench.floors: embed, search, broker hop, backend call, "
        "and the Milvus search-parameter sweep); the summary then gives every stage's ratio to its floor",
    )  # fmt: skip
    p.add_argument("--runs", type=int, default=1, help="repeat the pipeline phases (interleaved, medians)")
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME=SECTION.KEY=VALUE[;...]",
        help="another worker configuration, run after the default one in every run",
    )  # fmt: skip
    p.add_argument("--peer", action="store_true", help="also run the in-process peer (bench.peer) every run")
    return p.parse_args(argv)


async def _run_until_signal(args: argparse.Namespace) -> dict[str, Any]:
    """SIGTERM/SIGINT cancel the run, so its ``finally`` stops the worker and the stack."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    return await run(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench.overhead", *argv])
    if args.plot:
        print(f"wrote {plot_stages(args.plot, args.plot_out)}")
        return 0
    if args.compare:
        print(compare(args.compare))
        return 0
    quiet = wait_quiet(args.wait_quiet)
    try:
        report = asyncio.run(_run_until_signal(args))
    except asyncio.CancelledError:
        print("stopped by a signal; every process it started was stopped", file=sys.stderr)
        return 143
    report["before_start"] = quiet
    output = args.output or RESULTS / f"overhead-{args.preset}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(report))
    print(f"\nwritten to {output} ({report['wall_s']:.0f} s)")
    return 0
