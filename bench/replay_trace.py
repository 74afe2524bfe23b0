"""The fleet's recorded arrivals and token counts as a replay trace, and the GPU-vs-model comparison.

    python -m bench.replay_trace --out bench/results/gpu-replay-trace.json      # here (needs contradish)

The trace is the fleet benchmark's own workload (``bench.fleet.build_workbench`` with the small
preset's bursty arrival process and seeded answer lengths), ``n`` requests long, with mean rate 1
request per second: a replay at load ``x`` divides every arrival time by ``x``. Prompt lengths follow
the fleet's prompt layout (``agents/policy/prompt.py``) as the emulator counts tokens (4 characters
a token): a system turn, the examples echolm showed (their count taken per request from the recorded
echolm run, ``fleet-small-records.jsonl.gz``; each a rewording of the request plus a stand-in answer of
``tokens_median`` tokens) and the request.

``compare`` puts a GPU replay's per-request latencies beside ``devstack.batching.simulate`` of the same
jobs: medians, p90 and p99 of time to first token and of end-to-end latency, and the per-request
relative error of end-to-end latency.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from devstack.batching import (
    QWEN25_H200_NOTES,
    BatchLimits,
    Job,
    Outcome,
    ServiceModel,
    StepTable,
    fit_line,
    simulate,
)

__all__ = [
    "SYSTEM_TOKENS",
    "TEMPLATE_TOKENS",
    "build_trace",
    "compare",
    "context_fit",
    "jobs_at_load",
    "merge_runs",
    "quantiles",
    "turn_tokens",
]

SYSTEM_TOKENS = 60  # system prompt + the examples note, chat-template tokens included
TEMPLATE_TOKENS = 5  # per chat turn: <|im_start|>role\n ... <|im_end|>\n
RESULTS = Path(__file__).resolve().parent / "results"


def turn_tokens(text: str) -> int:
    """Tokens of one chat turn as the emulator counts them (4 characters a token, the turn's template)."""
    return math.ceil(len(text) / 4) + TEMPLATE_TOKENS


def _recorded_examples(records: Path) -> dict[str, int]:
    """request id -> number of examples echolm showed, from the recorded echolm burst."""
    out: dict[str, int] = {}
    with gzip.open(records, "rt") as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("system") == "echolm" and r.get("ok"):
                out[str(r["request_id"])] = int(r.get("n_examples") or 0)
    return out


def build_trace(
    n: int = 800, *, seed: int = 0, records: Path = RESULTS / "fleet-small-records.jsonl.gz"
) -> dict[str, Any]:
    """``n`` requests of the fleet's bursty stream at a mean of 1 request per second."""
    from bench.fleet.preset import PRESETS
    from bench.fleet.workbench import build_workbench

    preset = replace(PRESETS["small"], burst_requests=n, saturation_requests=0, seed=seed)
    bench = build_workbench(preset)
    examples = _recorded_examples(records)
    recorded = [examples[k] for k in sorted(examples)] or [0]
    rate = preset.burst_rate_rps
    rows = []
    for i, item in enumerate(bench.phases["burst"]):
        q = turn_tokens(item.text)
        shown = examples.get(item.request_id, recorded[i % len(recorded)])
        prompt = SYSTEM_TOKENS + q + shown * (q + preset.tokens_median + TEMPLATE_TOKENS)
        rows.append(
            {
                "request_id": item.request_id,
                "at": round(item.at * rate, 6),
                "prompt_tokens": prompt,
                "max_new_tokens": item.max_new_tokens,
                "examples": shown,
            }
        )
    return {
        "what": f"fleet workload (preset small, seed {seed}): bursty arrivals rescaled to a mean of 1 req/s "
        f"(peaks {preset.burst_peak:g}x for {preset.burst_fraction:.0%} of the time, bursts of "
        f"{preset.burst_mean_s:g} s at the fleet's {rate:g} req/s, so {preset.burst_mean_s * rate:g} "
        "arrivals long), answer lengths token_lengths(seed), examples per request from the recorded "
        "echolm run (fleet-small-records.jsonl.gz; requests past the recording reuse its counts in order)",
        "n": len(rows),
        "requests": rows,
    }


def jobs_at_load(trace: Mapping[str, Any], rate_rps: float) -> list[Job]:
    """The trace's jobs with arrivals compressed to a mean of ``rate_rps``."""
    return [
        Job(
            str(r["request_id"]), float(r["at"]) / rate_rps, int(r["prompt_tokens"]), int(r["max_new_tokens"])
        )
        for r in trace["requests"]
    ]


def quantiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}
    v = sorted(values)

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"n": len(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(v) / len(v)}


def _summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    return {
        "refused": sum(o.refused for o in outcomes),
        "ttft_s": quantiles([o.ttft_s for o in outcomes if o.ttft_s is not None]),
        "e2e_s": quantiles([o.e2e_s for o in outcomes if o.e2e_s is not None]),
    }


def compare(
    gpu: Sequence[Outcome], jobs: Sequence[Job], model: ServiceModel, limits: BatchLimits
) -> dict[str, Any]:
    """The model's latencies for ``jobs`` beside the GPU's, with relative differences (model / GPU - 1)."""
    sim = simulate(jobs, model, limits)
    g, m = _summary(gpu), _summary(sim)
    by_id = {o.request_id: o for o in sim}
    rel = [
        by_id[o.request_id].e2e_s / o.e2e_s - 1  # type: ignore[operator]
        for o in gpu
        if o.e2e_s and by_id[o.request_id].e2e_s is not None
    ]
    diff = {
        metric: {
            k: (m[metric][k] / g[metric][k] - 1) if g[metric][k] else math.nan for k in ("p50", "p90", "p99")
        }
        for metric in ("ttft_s", "e2e_s")
    }
    return {
        "model": model.name,
        "model_source": model.source,
        "gpu": g,
        "emulator": m,
        "relative_difference": diff,
        "per_request_e2e_abs_rel_error": quantiles([abs(x) for x in rel]),
        "within_15pct": all(
            abs(diff[metric][k]) <= 0.15 for metric in ("ttft_s", "e2e_s") for k in ("p50", "p90")
        ),
    }


def context_fit(grid: Mapping[str, float]) -> tuple[float, float]:
    """(a, b) of the context term, ms per step per token of the longest sequence = a + b x batch, from
    the engine's ``decode_ms_by_batch_x_context`` grid ("BxP": B sequences at position P, so the
    longest holds P + 1 tokens)."""
    by_batch: dict[int, list[tuple[int, float]]] = {}
    for key, ms in grid.items():
        b, p = (int(x) for x in key.split("x"))
        by_batch.setdefault(b, []).append((p + 1, float(ms)))
    slopes = {b: fit_line([c for c, _ in pts], [m for _, m in pts])[1] for b, pts in by_batch.items()}
    return fit_line(list(slopes), list(slopes.values()))


def _models(name: str, cal: Mapping[str, Any], grid: Mapping[str, float]) -> dict[str, ServiceModel]:
    batch = tuple(int(b) for b in cal["decode_ms"])
    fit = cal["prefill_fit"]
    per_token, fixed = max(float(fit["ms_per_token"]), 0.0), max(float(fit["fixed_ms"]), 0.0)
    table = StepTable(batch, tuple(float(v) for v in cal["decode_ms"].values()))
    ref = int(cal.get("decode_context", 400)) + 1
    notes = QWEN25_H200_NOTES[name]
    return {
        "notes_table": ServiceModel(
            name, notes.decode, per_token, fixed, "notes table + this engine's prefill"
        ),
        "engine_table": ServiceModel(name, table, per_token, fixed, "this engine's table (context 400)"),
        "engine_table_context": ServiceModel(
            name, table, per_token, fixed, "this engine's table + context term", ref, context_fit(grid)
        ),
    }


def merge_runs(trace: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from several GPU runs: every load's outcomes beside ``simulate`` under three models
    (the notes' table, this engine's table, and that table with the context term), each with the
    calibration of the run that replayed it; the context grid is the last run's that has one."""
    grids = {
        n: m["calibration"]["decode_ms_by_batch_x_context"]
        for r in runs
        for n, m in r["models"].items()
        if "decode_ms_by_batch_x_context" in m["calibration"]
    }
    out: dict[str, Any] = {
        "runs": [{k: r[k] for k in ("command", "device", "torch", "wall_s") if k in r} for r in runs],
        "trace": runs[0]["trace"],
        "models": {},
    }
    for index, run in enumerate(runs):
        for name, m in run["models"].items():
            entry = out["models"].setdefault(
                name, {"shape": m["shape"], "limits": m["limits"], "calibrations": [], "loads": []}
            )
            entry["calibrations"].append(
                {"run": index, **m["calibration"], "nominal_capacity_rps": m["nominal_capacity_rps"]}
            )
            models = _models(name, m["calibration"], grids[name])
            entry["context_ms"] = models["engine_table_context"].context_ms
            limits = BatchLimits(**m["limits"])
            for load in m["loads"]:
                jobs = jobs_at_load(trace, float(load["rate_rps"]))
                gpu = [Outcome(str(i), float(a), f, d) for i, a, f, d in load["outcomes"]]
                row = {k: load[k] for k in ("fraction", "rate_rps", "wall_s", "outcomes", "steps")}
                row["run"] = index
                row["compare"] = {key: compare(gpu, jobs, model, limits) for key, model in models.items()}
                entry["loads"].append(row)
        for entry in out["models"].values():
            entry["loads"].sort(key=lambda r: r["fraction"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu-replay-trace.json")
    parser.add_argument("-n", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge", type=Path, nargs="*", help="GPU run JSONs to merge and compare (into --out)"
    )
    parser.add_argument("--trace", type=Path, default=RESULTS / "gpu-replay-trace.json")
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge_runs(
            json.loads(args.trace.read_text()), [json.loads(p.read_text()) for p in args.merge]
        )
        args.out.write_text(json.dumps(merged, default=float))
        for name, entry in merged["models"].items():
            for row in entry["loads"]:
                cells = []
                for key, c in row["compare"].items():
                    d = c["relative_difference"]
                    cells.append(
                        f"{key} ttft {d['ttft_s']['p50']:+.2f}/{d['ttft_s']['p90']:+.2f} "
                        f"e2e {d['e2e_s']['p50']:+.2f}/{d['e2e_s']['p90']:+.2f}/{d['e2e_s']['p99']:+.2f}"
                    )
                print(f"{name} {row['fraction']:.1f}: " + " | ".join(cells))
        return 0
    trace = build_trace(args.n, seed=args.seed)
    args.out.write_text(json.dumps(trace, indent=0))
    prompts = [r["prompt_tokens"] for r in trace["requests"]]
    new = [r["max_new_tokens"] for r in trace["requests"]]
    print(
        f"{trace['n']} requests -> {args.out}; prompt tokens {quantiles(prompts)}; "
        f"new tokens {quantiles(new)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
