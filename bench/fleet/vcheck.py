"""The virtual fleet against the wall-clock one: replay the real-time sweep's requests on a virtual clock.

    python -m bench.fleet.vcheck --out bench/results/fleet-vcheck.json

The real-time sweep (``bench.fleet.sweep``, ``bench/results/fleet-sweep/*.json.gz``) served every
request through dev TGI servers running the same ``BatchScheduler`` and step model, slowed down 20x,
on a busy two-core host. Here each recorded request of the systems whose routing is fully recorded
(large-only, small-only, least-busy, quality-router: the replica each request went to) is offered to
``bench.fleet.virtual.run_fleet`` at the moment its generation started (its completion minus its
measured generation time) with its prompt and answer lengths, on the same replicas with the same
scaled step model. Per (system, load): the recorded and the virtual generation time (p50, p90, p99)
and the per-request relative error. What differs: the wall-clock emulator's event loop lags under CPU
load, and its token counts come from the rendered request (here: the decisions module's count).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet.preset import LARGE, SMALL
from bench.fleet.sweep import SweepPreset, sweep_workbench
from bench.fleet.virtual import Arrival, Dispatch, Replica, Router, run_fleet
from bench.replay_trace import SYSTEM_TOKENS, turn_tokens
from devstack.batching import QWEN25_H200_MEASURED, BatchLimits

__all__ = ["check_piece"]

RESULTS = Path(__file__).resolve().parents[1] / "results"
CHECKED = ("large-only", "small-only", "least-busy", "quality-router")
MODELS = {SMALL: "qwen2.5-0.5b", LARGE: "qwen2.5-1.5b"}


def _q(values: Sequence[float], p: float) -> float:
    return float(np.percentile(values, p)) if len(values) else float("nan")


def _fixed(route: dict[str, Dispatch]) -> Router:
    """The recorded routing: each request to the replica it went to."""
    return lambda a, _view: route[a.request_id]


def check_piece(piece: Path) -> list[dict[str, Any]]:
    data = json.loads(gzip.decompress(piece.read_bytes()))
    s = data["sweep"]
    sp = SweepPreset(
        time_scale=s["time_scale"],
        loads=tuple(s["loads"]),
        requests_per_load=s["requests_per_load"],
        seed=s["seed"],
    )
    bench, _meta = sweep_workbench(sp, data["pattern"], data["systems"])
    items = {(phase, x.request_id): x for phase, xs in bench.phases.items() for x in xs}
    out = []
    for system in (x for x in data["systems"] if x in CHECKED):
        for phase in bench.phases:
            rows = [r for r in data["records"] if r["system"] == system and r["phase"] == phase and r["ok"]]
            if not rows:
                continue
            arrivals, route, recorded = [], {}, {}
            for r in rows:
                item = items[(phase, r["request_id"])]
                start = r["done_s"] - r["generate_ms"] / 1000.0
                arrivals.append(Arrival(r["request_id"], start, item.max_new_tokens))
                route[r["request_id"]] = Dispatch(
                    r["backend"], SYSTEM_TOKENS + turn_tokens(item.text), r["tier"]
                )
                recorded[r["request_id"]] = r["generate_ms"] / 1000.0
            names = sorted({d.replica for d in route.values() if d.replica})
            replicas = [
                Replica(
                    n,
                    n.split("-")[0],
                    QWEN25_H200_MEASURED[MODELS[n.split("-")[0]]].scaled(sp.time_scale),
                    BatchLimits(),
                )
                for n in names
            ]
            served = run_fleet(arrivals, _fixed(route), replicas)
            virtual = {x.request_id: (x.done_s or float("nan")) - x.at_s for x in served}
            rec = [recorded[k] for k in virtual]
            vir = [virtual[k] for k in virtual]
            err = [abs(v - r) / r for v, r in zip(vir, rec, strict=True) if r > 0]
            out.append(
                {
                    "system": system,
                    "phase": phase,
                    "n": len(rows),
                    "recorded_s": {p: _q(rec, p) for p in (50, 90, 99)},
                    "virtual_s": {p: _q(vir, p) for p in (50, 90, 99)},
                    "abs_rel_error": {"median": _q(err, 50), "p90": _q(err, 90)},
                }
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "pieces", type=Path, nargs="*", default=sorted((RESULTS / "fleet-sweep").glob("*.json.gz"))
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet-vcheck.json")
    args = parser.parse_args(argv)
    from bench.hostfacts import host_facts, loadavg, metadata

    began, load_start = time.time(), loadavg()
    rows = [row for piece in args.pieces for row in check_piece(piece)]
    command = "python -m bench.fleet.vcheck " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        **metadata("fleet-vcheck", command=command, started_at=began, wall_s=round(time.time() - began, 1)),
        "machine": host_facts(loadavg_start=load_start, loadavg_end=loadavg()),
        "what": "bench.fleet.vcheck: the virtual fleet replaying the real-time sweep's recorded requests",
        "pieces": [str(p) for p in args.pieces],
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print("| system | load | n | recorded p50 / p99 (s) | virtual p50 / p99 (s) | error median / p90 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rec, vir, err = r["recorded_s"], r["virtual_s"], r["abs_rel_error"]
        print(
            f"| {r['system']} | {r['phase']} | {r['n']} | {rec[50]:.2f} / {rec[99]:.2f} | "
            f"{vir[50]:.2f} / {vir[99]:.2f} | {err['median']:.0%} / {err['p90']:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
