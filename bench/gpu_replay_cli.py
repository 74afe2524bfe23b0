"""``python -m bench.gpu_replay``'s command line and result file (split from ``bench/gpu_replay.py``,
which keeps the engine, the replay and the step measurement)."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.gpu_replay import BUCKETS, CONTEXT_STEP, SHAPES, TINY, Engine, measure, nominal_capacity, replay
from bench.replay_trace import compare, jobs_at_load
from devstack.batching import (
    QWEN25_H200_NOTES,
    BatchLimits,
    Outcome,
    ServiceModel,
    StepTable,
)

__all__ = ["main"]


def _outcome_rows(outcomes: Sequence[Outcome]) -> list[list[Any]]:
    return [[o.request_id, round(o.arrival_s, 6), o.first_token_s, o.done_s] for o in outcomes]


def _step_summary(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_size: dict[int, list[float]] = {}
    ctx: dict[int, list[int]] = {}
    for s in steps:
        if s["kind"] == "decode":
            by_size.setdefault(int(s["size"]), []).append(float(s["ms"]))
            ctx.setdefault(int(s["size"]), []).append(int(s["ctx"]))
    prefills = [[s["size"], s["tokens"], round(s["ms"], 3)] for s in steps if s["kind"] == "prefill"]
    return {
        "decode_steps": sum(len(v) for v in by_size.values()),
        "decode_ms_by_size": {b: [len(v), statistics.median(v)] for b, v in sorted(by_size.items())},
        "decode_max_context_by_size": {b: statistics.median(v) for b, v in sorted(ctx.items())},
        "prefills": prefills,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--trace", type=Path, default=Path(__file__).parent / "results" / "gpu-replay-trace.json"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--loads", default="0.2,0.4,0.6,0.8,1.0", help="fractions of the nominal capacity")
    parser.add_argument("--capacity", type=float, default=0.0, help="pin the nominal capacity (req/s)")
    parser.add_argument("-n", type=int, default=0, help="first n requests of the trace (0: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a toy model, for a smoke test on a CPU")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no new load after this")
    parser.add_argument(
        "--prefill",
        choices=["masked", "flash"],
        default="masked",
        help="masked: one packed pass with a block-diagonal mask; flash: attention per sequence "
        "(bench/gpu_prefill.py), TGI's kind of prefill",
    )
    args = parser.parse_args(argv)
    import torch

    began = time.perf_counter()
    trace = json.loads(args.trace.read_text())
    if args.n:
        trace = {**trace, "requests": trace["requests"][: args.n]}
    unit = jobs_at_load(trace, 1.0)
    max_len = -(-max(j.total_tokens for j in unit) // CONTEXT_STEP) * CONTEXT_STEP
    gpu_bytes = (
        torch.cuda.get_device_properties(0).total_memory if args.device.startswith("cuda") else 16 * 2**30
    )
    result: dict[str, Any] = {
        "command": "python3 -m bench.gpu_replay " + " ".join(argv or []),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "trace": {"what": trace.get("what", ""), "n": len(unit), "max_len": max_len},
        "prefill": args.prefill,
        "buckets": BUCKETS,
        "models": {},
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {msg}", flush=True)

    with torch.inference_mode():
        for name in args.models.split(","):
            shape = TINY if args.tiny else SHAPES[name]
            engine = Engine(shape, device=args.device, max_len=max_len)
            if args.prefill == "flash":
                from bench.gpu_prefill import prefill_flash

                engine.prefill = functools.partial(prefill_flash, engine)  # type: ignore[method-assign]
            engine.capture(log)
            cal = measure(engine, repeats=5 if args.tiny else 30)
            log(f"  {name}: decode ms {cal['decode_ms']}; prefill fit {cal['prefill_fit']}")
            fit = cal["prefill_fit"]
            measured = ServiceModel(
                name,
                StepTable(BUCKETS, tuple(cal["decode_ms"][b] for b in BUCKETS)),
                max(fit["ms_per_token"], 0.0),
                max(fit["fixed_ms"], 0.0),
                source="this engine, measured",
            )
            notes = QWEN25_H200_NOTES[name]
            notes = ServiceModel(
                name,
                notes.decode,
                measured.prefill_ms_per_token,
                measured.prefill_fixed_ms,
                source="notes table (gpu-qwen-h200.md) + this engine's prefill fit",
            )
            kv_bytes = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
            from devstack.batching import kv_token_budget

            limits = BatchLimits(
                max_batch_total_tokens=kv_token_budget(
                    gpu_bytes=gpu_bytes, weight_bytes=shape.params * 2, kv_bytes_per_token=kv_bytes
                )
            )
            capacity = args.capacity or nominal_capacity(measured, unit)
            entry: dict[str, Any] = {
                "shape": asdict(shape) | {"params": shape.params, "kv_bytes_per_token": kv_bytes},
                "calibration": cal,
                "limits": asdict(limits),
                "nominal_capacity_rps": capacity,
                "loads": [],
            }
            result["models"][name] = entry
            # Warm-up (not recorded): 32 requests at once, through prefill, every bucket up to 32, release.
            replay(engine, jobs_at_load({"requests": trace["requests"][:32]}, 1e6), limits)
            for fraction in (float(x) for x in args.loads.split(",") if x):
                if time.perf_counter() - began > args.budget_s:
                    log(f"  budget spent: load {fraction} not run")
                    continue
                jobs = jobs_at_load(trace, fraction * capacity)
                t = time.perf_counter()
                outcomes, steps = replay(engine, jobs, limits)
                row: dict[str, Any] = {
                    "fraction": fraction,
                    "rate_rps": fraction * capacity,
                    "wall_s": time.perf_counter() - t,
                    "outcomes": _outcome_rows(outcomes),
                    "steps": _step_summary(steps),
                    "vs_measured_table": compare(outcomes, jobs, measured, limits),
                    "vs_notes_table": compare(outcomes, jobs, notes, limits),
                }
                entry["loads"].append(row)
                c = row["vs_measured_table"]
                log(
                    f"  {name} load {fraction:.2f} ({fraction * capacity:.1f} req/s): gpu e2e p50 "
                    f"{c['gpu']['e2e_s']['p50']:.3f} s, model {c['emulator']['e2e_s']['p50']:.3f} s, "
                    f"refused {c['gpu']['refused']}, {row['wall_s']:.1f} s"
                )
                args.out.write_text(json.dumps(result, default=float))
            del engine
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - began
    args.out.write_text(json.dumps(result, default=float))
    return 0
