"""The fleet sweep on a virtual clock (issue 12): loads past every knee, three repetitions, in minutes.

    python -m bench.fleet.decisions --seed 0 --out bench/results/fleet-decisions.json.gz   # once
    python -m bench.fleet.decisions --seed 1 --out bench/results/fleet-decisions-seed1.json.gz
    python -m bench.fleet.vsweep tune  --decisions bench/results/fleet-decisions-seed1.json.gz
    python -m bench.fleet.vsweep run   --decisions bench/results/fleet-decisions.json.gz \\
        --load-term TUNED.json --out bench/results/fleet-vsweep.json

Why a virtual clock. The real-time sweep (``bench.fleet.sweep``) runs every request through the echolm
worker, Tansu, Milvus and dev TGI servers on two CPU cores, so it can only offer a few requests per
second, which is why it slows the emulated GPUs down 20x and why it never reached a knee: 60 requests
per load fit in one 128-sequence batch. Here the GPUs are ``bench.fleet.virtual`` (TGI's batching loop
per replica, timed by the H200 measurement of the Qwen2.5 0.5B/1.5B shapes, at real speed), and each
system's decisions are its own code on precomputed inputs:

* **echolm** and **echolm-load-blind**: ``choose_backend`` (the worker's router, with the load term, or
  with ``load_lambda = 0``) on each request's ``route_estimates`` (``bench.fleet.decisions``: the
  real MiniLM, bank, utility model, ``select_examples`` and bandit) and the replicas' live gauges as
  ``TGIQueueProbe`` would scrape them, plus its own pending requests; the chosen tier is shown the
  examples when ``route_estimates`` says so, and their tokens are prefilled;
* **semantic-cache**: a hit when the nearest bank row is at cosine >= 0.8 (answered at once), else the
  least-busy large replica; **quality-router** (RouteLLM-style stand-in): the small tier when that
  neighbour is at >= 0.8, else large; **least-busy** (LiteLLM): the replica of either tier with the
  fewest requests in flight; **large-only**, **small-only**: the least-busy replica of the tier.
* Control plane: each request reaches the fleet after a delay drawn from that system's own measured
  per-request overhead in the real-time sweep (``bench/results/fleet-sweep/*.json.gz``: latency minus
  generation, 480 requests a system, every stage real). Those were measured at up to 16 req/s; one
  echolm worker saturates near 36 replies/s (BENCHMARKS, issue 9), so every result states the workers
  its rate needs.

Quality: the measured cells (``bench.quality_cells``), per serving condition, with CIs. A request
refused by a full replica (TGI's 429 at 128 in the system) counts as failed: quality 0 and an
infinite latency in the percentiles.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet.preset import LARGE, SMALL
from bench.fleet.sweep import SWEEP_SYSTEMS
from bench.fleet.virtual import (
    Arrival,
    Dispatch,
    Feedback,
    FleetView,
    Replica,
    Router,
    Served,
    least_loaded,
    run_fleet,
)
from bench.quality_cells import PAPER_SMALL_MATCH
from devstack.batching import QWEN25_FLASH_PREFILL, QWEN25_H200_MEASURED, BatchLimits, Job, ServiceModel

__all__ = ["LoadTerm", "RouterSpec", "VSweep", "make_router", "run_point", "summarize"]

RESULTS = Path(__file__).resolve().parents[1] / "results"
SYSTEMS = (*SWEEP_SYSTEMS[:-1], "echolm-defaults", "echolm")  # the real-time sweep's, + shipped defaults
MODELS = {SMALL: "qwen2.5-0.5b", LARGE: "qwen2.5-1.5b"}


@dataclass(frozen=True, slots=True)
class LoadTerm:
    """The router's load settings (``RoutingSettings``): what ``tune`` searches."""

    load_lambda: float = 0.5
    load_gamma: float = 0.5
    load_q0: float = 2.0
    load_signal: str = "waiting"


@dataclass(frozen=True, slots=True)
class VSweep:
    loads: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    window_s: float = 60.0  # arrivals per point: rate x window
    reps: int = 3
    slots: int = 2
    prefill_tokens: int = 4096  # TGI's max_batch_prefill_tokens (module docstring of devstack.batching)
    prefill: str = (
        "flash"  # "flash": QWEN25_FLASH_PREFILL; "masked": the replay engine's (QWEN25_H200_MEASURED)
    )
    burst_peak: float = 2.5
    burst_fraction: float = 0.25
    burst_mean_s: float = 4.0
    seed: int = 10  # arrival seeds: seed + rep; the workload's own seed is the decisions file's

    def service(self, tier: str) -> ServiceModel:
        table = {"flash": QWEN25_FLASH_PREFILL, "masked": QWEN25_H200_MEASURED}[self.prefill]
        return table[MODELS[tier]]

    def limits(self) -> BatchLimits:
        return BatchLimits(max_batch_prefill_tokens=self.prefill_tokens)

    def replicas(self, system: str) -> list[Replica]:
        if system in ("large-only", "semantic-cache"):
            tiers = [LARGE] * self.slots
        elif system == "small-only":
            tiers = [SMALL] * self.slots
        else:
            tiers = [SMALL] * (self.slots // 2) + [LARGE] * (self.slots - self.slots // 2)
        seen: Counter[str] = Counter()
        out = []
        for tier in tiers:
            out.append(Replica(f"{tier}-{seen[tier]}", tier, self.service(tier), self.limits()))
            seen[tier] += 1
        return out


# --------------------------------------------------------------------------------------- inputs
def load_decisions(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gzip.decompress(path.read_bytes()))
    return data


def measured_overheads(pieces: Sequence[Path]) -> dict[str, list[float]]:
    """Per system: every answered request's latency minus generation in the real-time sweep (s)."""
    out: dict[str, list[float]] = {}
    for piece in pieces:
        data = json.loads(gzip.decompress(piece.read_bytes()))
        for r in data["records"]:
            if r["ok"] and r["done_s"] is not None:
                value = (r["done_s"] - r["sent_s"]) - (r.get("generate_ms") or 0.0) / 1000.0
                out.setdefault(r["system"], []).append(max(value, 0.0))
    return out


def large_only_capacity(sweep: VSweep, decisions: Mapping[str, Any]) -> float:
    """Nominal req/s of large-only's replicas on this stream (``bench.gpu_replay.nominal_capacity``)."""
    from bench.gpu_replay import nominal_capacity

    rows = decisions["decisions"]
    jobs = [
        Job(str(i), 0.0, rows[t]["tokens"], int(n)) for i, (t, n) in enumerate(decisions["stream"][:5000])
    ]
    return sweep.slots * nominal_capacity(sweep.service(LARGE), jobs)


def arrivals_at(sweep: VSweep, pattern: str, rate: float, rep: int, n_stream: int) -> tuple[list[float], int]:
    """Arrival times of one point (``rate x window_s`` of them) and where in the stream it starts."""
    from bench.workloads import arrival_times

    n = max(1, round(rate * sweep.window_s))
    rng = np.random.default_rng([sweep.seed, rep, int(rate * 1000)])
    start = int(rng.integers(0, n_stream))
    if pattern == "steady":
        times = np.arange(n) / rate
    elif pattern == "bursty":
        times = arrival_times(
            n, rate, "bursty", seed=sweep.seed + rep, burst_peak=sweep.burst_peak,
            burst_fraction=sweep.burst_fraction, burst_mean_s=sweep.burst_mean_s,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown pattern {pattern!r}; use steady or bursty")
    return [float(t) for t in times], start


# -------------------------------------------------------------------------------------- routers
@dataclass
class _Request:
    text: str
    group: str
    row: Mapping[str, Any]


def _condition(tier: str, shown: bool, req: _Request) -> str:
    if tier == LARGE:
        return "large_examples" if shown else "large"
    if not shown:
        return "small_alone"
    return "small_match" if req.group in req.row["example_groups"] else "small_related"


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """A system's router: its decision, what it does with a refusal (``retries``) and what its circuit
    breaker hears (``feedback``)."""

    route: Router
    retries: int = 0
    feedback: Feedback | None = None


def make_router(  # noqa: C901 - one branch per system, each a few lines
    system: str,
    requests: Mapping[str, _Request],
    replicas: Sequence[Replica],
    decisions: Mapping[str, Any],
    load_term: LoadTerm,
) -> RouterSpec:
    """``system``'s decision for one request, from what it can see at that moment. The baselines
    (``DirectDispatcher``) do not retry a refusal; echolm re-routes it (``tgi.retries``) and keeps
    its circuit breakers, as its serve agent does."""
    names = {t: [r.name for r in replicas if r.tier == t] for t in (SMALL, LARGE)}
    every = [r.name for r in replicas]
    threshold = float(decisions["semantic_threshold"])

    def tier_dispatch(tier: str, req: _Request, view: FleetView, shown: bool = False) -> Dispatch:
        extra = req.row["example_tokens"] if shown else 0
        return Dispatch(
            least_loaded(view, names[tier]), req.row["tokens"] + extra, _condition(tier, shown, req)
        )

    if system in ("large-only", "small-only"):
        tier = LARGE if system == "large-only" else SMALL
        return RouterSpec(lambda a, view: tier_dispatch(tier, requests[a.request_id], view))
    if system == "semantic-cache":

        def cache(a: Arrival, view: FleetView) -> Dispatch:
            req = requests[a.request_id]
            if req.row["nearest"] >= threshold:
                same = req.row["nearest_group"] == req.group
                return Dispatch(None, 0, "cache_match" if same else "cache_other")
            return tier_dispatch(LARGE, req, view)

        return RouterSpec(cache)
    if system == "quality-router":
        return RouterSpec(
            lambda a, view: tier_dispatch(
                SMALL if requests[a.request_id].row["nearest"] >= threshold else LARGE,
                requests[a.request_id],
                view,
            )
        )
    if system == "least-busy":

        def busy(a: Arrival, view: FleetView) -> Dispatch:
            req = requests[a.request_id]
            name = least_loaded(view, every)
            tier = SMALL if name.startswith(SMALL) else LARGE
            return Dispatch(name, req.row["tokens"], _condition(tier, False, req))

        return RouterSpec(busy)
    if system in ("echolm", "echolm-load-blind", "echolm-defaults"):
        from agents.policy.routing import ArmEstimate, BackendView, choose_backend
        from infra.errors import NoBackendAvailable
        from infra.settings import BackendSettings, RoutingSettings

        term = {"echolm-load-blind": LoadTerm(load_lambda=0.0), "echolm-defaults": LoadTerm()}.get(
            system, load_term
        )
        routing = RoutingSettings(**{**decisions["routing"], **asdict(term)})
        by_tier = {b["tier"]: BackendSettings(**b) for b in decisions["backends"]}
        views = [
            BackendView.from_settings(by_tier[r.tier].model_copy(update={"name": r.name})) for r in replicas
        ]
        stale = float(decisions["stale_after_s"])
        breaker = breaker_of(decisions)

        def echolm(a: Arrival, view: FleetView) -> Dispatch:
            req = requests[a.request_id]
            estimates = {t: ArmEstimate(m, w) for t, (m, w) in req.row["estimates"].items()}
            kwargs: dict[str, Any] = {
                "estimates": estimates, "examples": req.row["shown"], "backends": views,
                "depths": view.samples, "now": view.now, "stale_after_s": stale, "settings": routing,
                "pending": view.pending(), "exclude": view.exclude,
            }  # fmt: skip
            try:
                d = choose_backend(**kwargs, open_circuits=frozenset(breaker.open_backends(view.now)))
            except NoBackendAvailable:  # every circuit open: serve waits for one to half-open; here at once
                d = choose_backend(**kwargs)
            breaker.record_attempt(d.backend, view.now)
            extra = req.row["example_tokens"] if d.with_examples else 0
            return Dispatch(d.backend, req.row["tokens"] + extra, _condition(d.tier, d.with_examples, req))

        def heard(name: str, ok: bool, t: float) -> None:
            (breaker.record_success if ok else breaker.record_failure)(name, t)

        return RouterSpec(echolm, int(decisions["retries"]), heard)
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")


def breaker_of(decisions: Mapping[str, Any]) -> Any:
    """The worker's circuit breaker with its settings (``tgi.circuit_failures``, ``circuit_reset_s``)."""
    from agents.policy.circuit import CircuitBreaker

    return CircuitBreaker(
        failures=int(decisions["circuit_failures"]), reset_s=float(decisions["circuit_reset_s"])
    )


# ------------------------------------------------------------------------------------------ one point
@dataclass
class Point:
    system: str
    pattern: str
    load: float
    rep: int
    rate_rps: float
    served: list[Served] = field(default_factory=list)
    sent: dict[str, float] = field(default_factory=dict)  # request id -> when the client sent it


def run_point(
    system: str,
    pattern: str,
    load: float,
    rep: int,
    *,
    sweep: VSweep,
    decisions: Mapping[str, Any],
    overheads: Mapping[str, Sequence[float]],
    capacity: float,
    load_term: LoadTerm = LoadTerm(),
) -> Point:
    rate = load * capacity
    stream = decisions["stream"]
    times, start = arrivals_at(sweep, pattern, rate, rep, len(stream))
    rows = decisions["decisions"]
    rng = np.random.default_rng([sweep.seed, rep, 7, SYSTEMS.index(system), int(load * 1000)])
    measured_as = {"echolm-defaults": "echolm"}.get(system, system)  # the same worker, other settings
    if not overheads.get(measured_as):
        raise ValueError(
            f"no measured control-plane overhead for {measured_as!r}: pass the real-time sweep's pieces "
            "(--overheads bench/results/fleet-sweep/*.json.gz)"
        )
    delays = np.asarray(overheads[measured_as])
    requests: dict[str, _Request] = {}
    arrivals: list[Arrival] = []
    sent: dict[str, float] = {}
    for i, t in enumerate(times):
        text, new = stream[(start + i) % len(stream)]
        rid = f"{pattern}-{load:g}-{rep}-{i:06d}"
        requests[rid] = _Request(text, rows[text]["group"], rows[text])
        sent[rid] = t
        arrivals.append(Arrival(rid, t + float(rng.choice(delays)), int(new)))
    replicas = sweep.replicas(system)
    spec = make_router(system, requests, replicas, decisions, load_term)
    served = run_fleet(
        arrivals, spec.route, replicas, probe_interval_s=float(decisions["probe_interval_s"]),
        retries=spec.retries, feedback=spec.feedback,
    )  # fmt: skip
    return Point(system, pattern, load, rep, rate, served, sent)


def summarize(point: Point, cells: Any) -> dict[str, Any]:
    """Latency (refused = infinite), throughput, offload, quality with CI, and offload over time."""
    lat = np.asarray(
        [math.inf if s.refused else s.done_s - point.sent[s.request_id] for s in point.served]  # type: ignore[operator]
    )
    ttft = [s.first_token_s - point.sent[s.request_id] for s in point.served if s.first_token_s is not None]
    done = [s.done_s for s in point.served if s.done_s is not None]
    span = max(done) - min(point.sent.values()) if done else math.nan
    counts = Counter("failed" if s.refused else s.tag for s in point.served)
    small = sum(1 for s in point.served if not s.refused and _offloaded(s))
    answered = sum(1 for s in point.served if not s.refused)
    bins: dict[int, list[int]] = {}
    for s in point.served:
        b = int(point.sent[s.request_id] // 5)
        bins.setdefault(b, [0, 0])
        bins[b][0] += int(_offloaded(s))
        bins[b][1] += 1
    return {
        "system": point.system,
        "pattern": point.pattern,
        "load": point.load,
        "rep": point.rep,
        "rate_rps": point.rate_rps,
        "n": len(point.served),
        "refused": int(sum(s.refused for s in point.served)),
        "p50_s": _pct(lat, 50),
        "p90_s": _pct(lat, 90),
        "p99_s": _pct(lat, 99),
        "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else math.nan,
        "throughput_rps": len(done) / span if span and span > 0 else math.nan,
        "offload": small / answered if answered else math.nan,
        "conditions": dict(counts),
        "quality": cells.score(counts).as_dict(),
        # sensitivity only: the paper's 0.56 in the small-with-examples cells, never a headline
        "quality_paper_small_match": cells.with_small_match(PAPER_SMALL_MATCH, "PAPER")
        .score(counts)
        .as_dict(),
        "offload_by_5s": [round(v[0] / v[1], 3) for _, v in sorted(bins.items())],
        "latency_quantiles_s": [_pct(lat, q) for q in range(0, 101, 5)],
    }


def _offloaded(s: Served) -> bool:
    """Answered without the large tier: a cache hit or the small tier (a refused request counts by the
    replica that refused it last)."""
    return s.replica is None or s.replica.startswith(SMALL)


def _pct(values: np.ndarray, q: float) -> float:
    """A percentile without interpolation, so refused requests (infinite latency) stay infinite."""
    return float(np.percentile(values, q, method="inverted_cdf")) if len(values) else math.nan


# ------------------------------------------------------------------------------------------- drivers
_STATE: dict[str, Any] = {}


def _task(args: tuple[str, str, float, int, LoadTerm]) -> dict[str, Any]:
    system, pattern, load, rep, term = args
    s = _STATE
    point = run_point(
        system, pattern, load, rep, sweep=s["sweep"], decisions=s["decisions"], overheads=s["overheads"],
        capacity=s["capacity"], load_term=term,
    )  # fmt: skip
    out = summarize(point, s["cells"])
    out["load_term"] = asdict(term)
    return out


def run_many(
    tasks: Sequence[tuple[str, str, float, int, LoadTerm]],
    *,
    sweep: VSweep,
    decisions: Mapping[str, Any],
    overheads: Mapping[str, Sequence[float]],
    cells: Any,
    processes: int,
) -> list[dict[str, Any]]:
    """Every task, over ``processes`` forked workers (the state is shared by fork, not pickled)."""
    import multiprocessing as mp

    from tqdm import tqdm

    _STATE.update(
        sweep=sweep, decisions=decisions, overheads=overheads, cells=cells,
        capacity=large_only_capacity(sweep, decisions),
    )  # fmt: skip
    bar = tqdm(total=len(tasks), desc="points", unit="pt", file=sys.stderr)
    out: list[dict[str, Any]] = []
    if processes <= 1:
        for t in tasks:
            out.append(_task(t))
            bar.update()
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            for row in pool.imap_unordered(_task, tasks, chunksize=1):
                out.append(row)
                bar.update()
    bar.close()
    return out


def medians(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, float], dict[str, Any]]:
    """Per (system, pattern, load): the median over repetitions of every latency and the quality."""
    groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["pattern"], r["load"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        med: dict[str, Any] = {
            k: float(np.median([r[k] for r in rs]))
            for k in ("p50_s", "p90_s", "p99_s", "ttft_p50_s", "throughput_rps", "offload", "rate_rps")
        }
        med["refused"] = int(sum(r["refused"] for r in rs))
        med["n"] = int(sum(r["n"] for r in rs))
        med["reps"] = len(rs)
        for q in ("quality_paper_small_match", "quality"):
            med[q] = {k: float(np.median([r[q][k] for r in rs])) for k in ("mean", "ci_low", "ci_high")}
        med["p99_range_s"] = [min(r["p99_s"] for r in rs), max(r["p99_s"] for r in rs)]
        out[key] = med
    return out


def capacity_table(
    med: Mapping[tuple[str, str, float], Mapping[str, Any]], slo_s: float
) -> dict[str, dict[str, float | None]]:
    """Per pattern and system: the offered req/s where the median p99 crosses ``slo_s``."""
    from bench.fleet.sweep_report import capacity_at_slo

    out: dict[str, dict[str, float | None]] = {}
    for (system, pattern, _load), _m in med.items():
        out.setdefault(pattern, {}).setdefault(system, None)
    for pattern, systems in out.items():
        for system in systems:
            pts = [
                (m["rate_rps"], m["p99_s"]) for (s, p, _), m in med.items() if s == system and p == pattern
            ]
            systems[system] = capacity_at_slo(pts, slo_s)
    return out


def slo_of(
    med: Mapping[tuple[str, str, float], Mapping[str, Any]], loads: Sequence[float]
) -> tuple[float, float]:
    """Two p99 SLOs, fixed before any result: tight, 3x large-only's median p50 at its lightest load,
    steady (the real-time sweep's rule: where queueing starts to show); loose, 2x large-only's median
    p99 there (where a fleet has clearly broken down)."""
    base = med[("large-only", "steady", min(loads))]
    return 3.0 * float(base["p50_s"]), 2.0 * float(base["p99_s"])


def tune(
    decisions: Mapping[str, Any],
    overheads: Mapping[str, Sequence[float]],
    cells: Any,
    sweep: VSweep,
    grid: Sequence[LoadTerm],
    processes: int,
) -> dict[str, Any]:
    """Each load term on both patterns and every load (one repetition); the best is the one with the
    highest mean capacity at the SLO (over both patterns) among those whose quality stays at or above
    ``floor`` (large-only's 0.5 minus 0.02) at every point that meets the SLO."""
    tasks = [
        ("echolm", pattern, load, 0, term)
        for term in grid
        for pattern in ("steady", "bursty")
        for load in sweep.loads
    ] + [
        (system, pattern, load, 0, LoadTerm())
        for system in ("large-only", "echolm-load-blind")
        for pattern in ("steady", "bursty")
        for load in sweep.loads
    ]
    rows = run_many(
        tasks, sweep=sweep, decisions=decisions, overheads=overheads, cells=cells, processes=processes
    )
    base = [r for r in rows if r["system"] != "echolm"]
    slo, _loose = slo_of(medians(base), sweep.loads)
    floor = 0.48
    scored: list[dict[str, Any]] = []
    for term in grid:
        mine = [r for r in rows if r["system"] == "echolm" and r["load_term"] == asdict(term)]
        med = medians(mine)
        caps = capacity_table(med, slo)
        mean_cap = float(np.mean([c or 0.0 for p in caps.values() for c in p.values()]))
        worst_q = min((r["quality"]["mean"] for r in mine if r["p99_s"] <= slo), default=math.nan)
        scored.append(
            {
                "term": asdict(term),
                "capacity_mean_rps": mean_cap,
                "capacities": caps,
                "worst_quality": worst_q,
            }
        )
    eligible = [s for s in scored if s["worst_quality"] >= floor] or scored
    best = max(eligible, key=lambda s: (s["capacity_mean_rps"], s["worst_quality"]))
    blind_caps = capacity_table(medians([r for r in base if r["system"] == "echolm-load-blind"]), slo)
    defaults = next((s for s in scored if s["term"] == asdict(LoadTerm())), None)
    return {
        "slo_s": slo,
        "quality_floor": floor,
        "best": best,
        "defaults": defaults,
        "grid": scored,
        "load_blind_capacities": blind_caps,
    }


def default_grid() -> list[LoadTerm]:
    return [
        LoadTerm(load_lambda=lam, load_gamma=g, load_q0=q0, load_signal=sig)
        for lam, g, q0, sig in itertools.product(
            (0.5, 1.0, 2.0, 4.0), (0.2, 0.5), (0.0, 2.0, 16.0), ("waiting", "total")
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "every system, pattern, load and repetition"),
        ("tune", "search the load term"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--decisions", type=Path, default=RESULTS / "fleet-decisions.json.gz")
        p.add_argument(
            "--overheads", type=Path, nargs="*", default=sorted((RESULTS / "fleet-sweep").glob("*.json.gz"))
        )
        p.add_argument("--loads", default=",".join(f"{x:g}" for x in VSweep().loads))
        p.add_argument("--window-s", type=float, default=VSweep().window_s)
        p.add_argument("--prefill-tokens", type=int, default=VSweep().prefill_tokens)
        p.add_argument("--prefill", choices=["flash", "masked"], default=VSweep().prefill)
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1))
        p.add_argument("--out", type=Path, required=True)
    sub.choices["run"].add_argument("--systems", default=",".join(SYSTEMS))
    sub.choices["run"].add_argument("--load-term", type=Path, help="a tune result: use its best term")
    args = parser.parse_args(argv)
    from bench.hostfacts import host_facts, loadavg, metadata
    from bench.quality_cells import QualityCells

    sweep = VSweep(
        loads=tuple(float(x) for x in args.loads.split(",")), window_s=args.window_s, reps=args.reps,
        prefill_tokens=args.prefill_tokens, prefill=args.prefill,
    )  # fmt: skip
    decisions = load_decisions(args.decisions)
    overheads = measured_overheads(args.overheads)
    cells = QualityCells.load()
    began = time.time()
    load_start = loadavg()
    common = {
        "decisions_file": str(args.decisions),
        "workload_seed": decisions["sweep"]["seed"],
        "sweep": {
            k: getattr(sweep, k)
            for k in ("loads", "window_s", "reps", "slots", "prefill_tokens", "prefill", "seed")
        },
        "large_only_nominal_rps": large_only_capacity(sweep, decisions),
        "overhead_p50_ms": {k: 1000 * float(np.median(v)) for k, v in overheads.items()},
        "quality_source": cells.source,
    }
    if args.command == "tune":
        result = {"what": "bench.fleet.vsweep tune", **common}
        result |= tune(decisions, overheads, cells, sweep, default_grid(), args.processes)
        print(json.dumps(result["best"], indent=1))
    else:
        term = (
            LoadTerm(**json.loads(args.load_term.read_text())["best"]["term"])
            if args.load_term
            else LoadTerm()
        )
        systems = [s for s in args.systems.split(",") if s]
        tasks = [
            (system, pattern, load, rep, term)
            for rep in range(sweep.reps)
            for pattern in ("steady", "bursty")
            for load in sweep.loads
            for system in systems
        ]
        rows = run_many(
            tasks,
            sweep=sweep,
            decisions=decisions,
            overheads=overheads,
            cells=cells,
            processes=args.processes,
        )
        med = medians(rows)
        slo, loose = slo_of(med, sweep.loads)
        result = {
            "what": "bench.fleet.vsweep run",
            **common,
            "load_term": asdict(term),
            "load_term_source": str(args.load_term) if args.load_term else "defaults",
            "slo_s": slo,
            "capacity_at_slo_rps": capacity_table(med, slo),
            "slo_loose_s": loose,
            "capacity_at_loose_slo_rps": capacity_table(med, loose),
            "medians": [
                {"system": s, "pattern": p, "load": ld, **m} for (s, p, ld), m in sorted(med.items())
            ],
            "rows": rows,
        }
    command = "python -m bench.fleet.vsweep " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = metadata("fleet-vsweep", command=command, started_at=began, wall_s=round(time.time() - began, 1))
    result = {**meta, "machine": host_facts(loadavg_start=load_start, loadavg_end=loadavg()), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, default=float))
    print(f"{args.command}: {result['wall_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
