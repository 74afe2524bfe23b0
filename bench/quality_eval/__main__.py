"""``python -m bench.quality_eval {prepare,run,report,compact}`` (docs/evaluation.md, "Measured quality").

python -m bench.quality_eval prepare              # once: the manifest and the local text/vector cache
nice -n 19 python -m bench.quality_eval run --budget-s 540     # repeat: resumes from the cache
python -m bench.quality_eval report [--update-benchmarks]      # tables from the cache
python -m bench.quality_eval labels                            # utility-model rows (measured helpfulness)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build bench/data/quality-sharegpt.json and the local cache")
    p.add_argument(
        "--rebuild", action="store_true", help="replace the committed manifest (changes the prompts)"
    )
    p = sub.add_parser("run", help="generate what the cache lacks, in schedule order, within a budget")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of this piece (s)")
    p.add_argument(
        "--judge-every", type=int, default=None, help="judge every n-th primary pair (both orders)"
    )
    p = sub.add_parser("report", help="score the cache; print the tables; optionally write the results")
    p.add_argument(
        "--update-benchmarks",
        action="store_true",
        help="write bench/results/quality-cells.json and BENCHMARKS.md's Measured quality section",
    )
    sub.add_parser("compact", help="rewrite the generation cache as one gzip member")
    p = sub.add_parser("labels", help="utility-model training rows from the scored generations")
    p.add_argument("--out", default="bench/results/quality/utility-labels.jsonl", help="JSONL rows to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "prepare":
        from bench.quality_eval.prepare import prepare

        prepare(rebuild=args.rebuild)
        return 0
    if args.command == "run":
        from bench.quality_eval.run import main as run_main

        return run_main(args.budget_s, args.judge_every)
    if args.command == "labels":
        from pathlib import Path

        from bench.quality_eval.cache import GenerationCache
        from bench.quality_eval.engine import Engine
        from bench.quality_eval.labels import write_label_rows
        from bench.quality_eval.report import score_all
        from bench.quality_eval.run import CACHE_DIR
        from bench.quality_eval.workspace import Workspace

        ws = Workspace.load()
        n = write_label_rows(Path(args.out), ws, score_all(ws, Engine(GenerationCache(CACHE_DIR))))
        print(f"wrote {n} rows to {args.out}")
        return 0
    if args.command == "compact":
        from bench.quality_eval.cache import GenerationCache
        from bench.quality_eval.run import CACHE_DIR

        print(f"{GenerationCache(CACHE_DIR).compact()} rows")
        return 0
    from bench.quality_eval.report import main as report_main

    return int(report_main(update=args.update_benchmarks))


if __name__ == "__main__":
    raise SystemExit(main())
