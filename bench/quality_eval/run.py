"""Resumable generation in pieces: ``python -m bench.quality_eval run --budget-s 540``.

Walks ``schedule.build_schedule`` in order, skips every job whose generation is cached, and generates
the rest until the budget is nearly spent (it stops before a job that would likely overrun it, judged
from the slowest job of this piece so far). Killing it loses at most the job in flight; running it
again continues. Meant to run under ``nice -n 19`` beside other work; a SIGSTOP/SIGCONT pause only
shows up as longer timings.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.quality_eval.cache import GenerationCache
from bench.quality_eval.engine import Engine, params_for
from bench.quality_eval.judge import JUDGE_MAX_TOKENS, judge_messages
from bench.quality_eval.schedule import Job, build_schedule
from bench.quality_eval.workspace import Workspace, tier_of
from infra.protocols import ChatMessage

__all__ = ["CACHE_DIR", "MAX_NEW_TOKENS", "RunSummary", "job_request", "run"]

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / "bench" / "results" / "quality"
MAX_NEW_TOKENS = 96
SCHEDULE = {"secondary_every": 2, "fact_every": 2}


@dataclass(frozen=True, slots=True)
class RunSummary:
    generated: int
    cached: int
    remaining: int
    wall_s: float
    stopped: str


def job_request(
    ws: Workspace, engine: Engine, job: Job
) -> tuple[str, list[ChatMessage], dict[str, object]] | None:
    """(tier, messages, params) of a job, or None when it cannot run yet (a judge job whose two
    answers are not cached)."""
    if job.kind == "sharegpt":
        return (
            tier_of(job.condition),
            ws.sharegpt_plan(job.item).messages[job.condition],
            params_for(MAX_NEW_TOKENS),
        )
    if job.kind == "fact":
        return (
            tier_of(job.condition),
            ws.fact_plan(job.item).messages[job.condition],
            params_for(MAX_NEW_TOKENS),
        )
    plan = ws.sharegpt_plan(job.item)
    params = params_for(MAX_NEW_TOKENS)
    first = engine.cached("small", plan.messages["small_two_stage"], params)
    second = engine.cached("large", plan.messages["large"], params)
    if first is None or second is None:
        return None
    a, b = (first.text, second.text) if job.condition == "ab" else (second.text, first.text)
    return "large", judge_messages(ws.prompt(job.item), a, b), params_for(JUDGE_MAX_TOKENS)


def run(
    budget_s: float,
    *,
    judge_every: int | None = None,
    cache_dir: Path = CACHE_DIR,
    say: Callable[[str], None] = print,
) -> RunSummary:
    started = time.monotonic()
    ws = Workspace.load()
    cache = GenerationCache(cache_dir)
    engine = Engine(cache)
    jobs = build_schedule(len(ws.corpus.live), len(ws.questions), judge_every=judge_every, **SCHEDULE)
    say(f"{len(jobs)} jobs, {len(cache)} generations cached; loading took {time.monotonic() - started:.0f} s")
    slowest, cached, done, stopped = 30.0, 0, 0, "schedule complete"
    for n, job in enumerate(jobs):
        request = job_request(ws, engine, job)
        if request is None:
            continue
        tier, messages, params = request
        if engine.cached(tier, messages, params) is not None:
            cached += 1
            continue
        elapsed = time.monotonic() - started
        if elapsed + slowest > budget_s:
            stopped = f"budget: {elapsed:.0f} s used, next job could take {slowest:.0f} s"
            break
        t0 = time.monotonic()
        hit = engine.generate(tier, messages, params)
        took = time.monotonic() - t0
        slowest = max(slowest, took)
        done += 1
        say(
            f"[{n + 1}/{len(jobs)}] {job.kind}:{job.item}:{job.condition} {tier} "
            f"{hit.prompt_tokens}+{hit.completion_tokens} tok in {took:.1f} s (prefill {hit.ttft_s:.1f} s)"
        )
    remaining = sum(
        1 for job in jobs if (r := job_request(ws, engine, job)) is not None and engine.cached(*r) is None
    )
    return RunSummary(done, cached, remaining, time.monotonic() - started, stopped)


def main(budget_s: float, judge_every: int | None) -> int:
    def say(message: str) -> None:
        print(f"[quality {time.strftime('%H:%M:%S', time.gmtime())}] {message}", file=sys.stderr, flush=True)

    summary = run(budget_s, judge_every=judge_every, say=say)
    say(
        f"generated {summary.generated}, {summary.cached} were cached, {summary.remaining} left "
        f"in {summary.wall_s:.0f} s ({summary.stopped})"
    )
    return 0
