"""A bounded soak on the local stack: steady load, then a burst, then the drain (issue 5).

    python -m bench.soak                               # 5 min at 8 req/s, 45 s at 4x, drain (~8 min)
    python -m bench.soak --steady-s 60 --rate 5        # a quick look
    python -m bench.soak --workers 2 --burst-x 6

What runs: a Tansu broker, the embedded Milvus server and two dev TGI servers on the *emulated*
engine (``devstack.tgi_emulator``: default service-time model, continuous batching up to 16), all from
``devstack.localstack.LocalStack``, plus ``--workers`` real ``echolm worker`` subprocesses (MiniLM, every
agent). This process is the client (``EchoClient``, open loop: requests go out on schedule whether or
not replies came back) and the observer. Every ``--sample-s`` it records:

* consumer lag of the workers' group (``worker.app_id``) per topic it reads (requests, prepared,
  log): sum over partitions of the end offset minus the committed offset (``list_consumer_group_offsets``
  with explicit partitions, as Tansu needs). ``kafka.producer_max_batch_size=1`` (the default) keeps
  Tansu's end offsets right (it reports wrong ones after multi-record batches);
* RSS of each worker process (``/proc/PID/status`` VmRSS);
* requests sent, replies received, errors.

Pass criteria (the exit status is 1 when one fails): every request answered, zero error replies,
lag back to zero within ``--drain-timeout-s`` after the burst, and worker RSS flat during the
steady phase after a warm-up (growth under ``--rss-growth-mb``). Results: ``bench/results/soak.json``
(``--out``), a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.hostfacts import host_facts, loadavg, metadata
from bench.stats import percentile

__all__ = ["SoakConfig", "main", "run_soak"]

ROOT = Path(__file__).resolve().parents[1]
GROUP_TOPICS = ("requests", "prepared", "log")
QUESTIONS = (
    "How do I reset my password?",
    "How do I cancel my subscription?",
    "What time does the store open on Sunday?",
    "Can I return an item without a receipt?",
    "How long does shipping to Canada take?",
    "How do I change my email address?",
    "Do you offer student discounts?",
    "Where can I download my invoice?",
    "Why was my card declined?",
    "How do I update my billing address?",
)


def _say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SoakConfig:
    steady_s: float = 300.0
    rate: float = 8.0
    burst_x: float = 4.0
    burst_s: float = 45.0
    workers: int = 1
    max_new_tokens: int = 8
    warmup_s: float = 60.0
    sample_s: float = 2.0
    drain_timeout_s: float = 240.0
    rss_growth_mb: float = 64.0
    tenants: int = 2


@dataclass
class _Tally:
    sent: dict[str, float] = field(default_factory=dict)  # request id -> phase start-relative send time
    phase_of: dict[str, str] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


async def group_lag(settings: Any, admin: Any, consumer: Any) -> dict[str, int]:
    """Per topic: sum over partitions of (end offset - committed offset) for the workers' group."""
    from aiokafka import TopicPartition

    tps = [
        TopicPartition(settings.topic(t), p) for t in GROUP_TOPICS for p in range(settings.kafka.partitions)
    ]
    committed = await admin.list_consumer_group_offsets(settings.worker.app_id, partitions=tps)
    ends = await consumer.end_offsets(tps)
    lag = dict.fromkeys(GROUP_TOPICS, 0)
    for tp in tps:
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        name = tp.topic.removeprefix(settings.kafka.topic_prefix + ".")
        lag[name] += max(0, ends[tp] - done)
    return lag


async def run_soak(
    config: SoakConfig,
    *,
    data_dir: Path,
    command: str,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    from devstack.localstack import LocalStack
    from devstack.workers import WorkerProcess
    from echolm.client import EchoClient
    from infra.kafka import kafka_client_kwargs, kafka_consumer_kwargs
    from infra.settings import load_settings
    from streams.topology import topic_specs

    tag = uuid.uuid4().hex[:6]
    sections: dict[str, dict[str, Any]] = {
        "stack": {"data_dir": str(data_dir)},
        "kafka": {"topic_prefix": f"soak{tag}", "producer_max_batch_size": 1},
        "milvus": {"collection": f"soak{tag}"},
        "worker": {
            "app_id": f"soak{tag}",
            "metrics_port": 0,
            "web_port": 0,
            "data_dir": str(data_dir / "worker"),
        },
    }
    for section, values in (overrides or {}).items():
        sections[section] = {**sections.get(section, {}), **values}
    settings = load_settings(**sections)
    began, started, load_start = time.monotonic(), time.time(), loadavg()
    stack = LocalStack(
        settings,
        milvus="server",
        backend_engine="emulated",
        backend_args=["--max-batch-size", "16"],
        topics=topic_specs(settings),
        data_dir=data_dir,
        ephemeral=True,
        progress=_say,
    )
    samples: list[dict[str, Any]] = []
    tally = _Tally()
    workers: list[WorkerProcess] = []
    phases: dict[str, tuple[float, float]] = {}
    drained_after_s: float | None = None
    await stack.start()
    try:
        settings = stack.apply(settings)
        for i in range(config.workers):
            worker = WorkerProcess(settings, log_path=data_dir / f"worker-{i}.log", name=f"worker-{i}")
            worker.start()
            workers.append(worker)
        await asyncio.gather(*(w.wait_ready(timeout_s=180) for w in workers))
        _say(f"{config.workers} worker(s) ready after {time.monotonic() - began:.0f} s")
        admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
        await admin.start()
        lag_consumer = AIOKafkaConsumer(**kafka_consumer_kwargs(settings), group_id=None)
        await lag_consumer.start()
        async with EchoClient(settings) as client:
            t0 = time.monotonic()

            async def read_replies() -> None:
                async for reply in client.replies():
                    tally.answered += 1
                    phase = tally.phase_of.get(reply.request_id, "?")
                    if reply.ok:
                        tally.latencies.setdefault(phase, []).append(reply.latency_s)
                    else:
                        tally.errors[reply.error_code] = tally.errors.get(reply.error_code, 0) + 1

            async def send(phase: str, rate: float, seconds: float) -> None:
                start = time.monotonic()
                phases[phase] = (round(start - t0, 2), round(start - t0 + seconds, 2))
                n = int(rate * seconds)
                for i in range(n):
                    due = start + i / rate
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    k = len(tally.sent)
                    tenant = f"tenant{k % config.tenants}"
                    prompt = f"{QUESTIONS[k % len(QUESTIONS)]} (order {k // len(QUESTIONS)})"
                    rid = await client.send(prompt, tenant=tenant, max_new_tokens=config.max_new_tokens)
                    tally.sent[rid] = time.monotonic() - t0
                    tally.phase_of[rid] = phase

            async def sample() -> None:
                while True:
                    lag = await group_lag(settings, admin, lag_consumer)
                    samples.append(
                        {
                            "t": round(time.monotonic() - t0, 2),
                            "lag": lag,
                            "rss_mb": {w.name: rss_mb(w.pid) for w in workers if w.pid},
                            "sent": len(tally.sent),
                            "answered": tally.answered,
                            "errors": sum(tally.errors.values()),
                        }
                    )
                    await asyncio.sleep(config.sample_s)

            reader = asyncio.create_task(read_replies())
            sampler = asyncio.create_task(sample())
            _say(f"steady: {config.rate:g} req/s for {config.steady_s:.0f} s")
            await send("steady", config.rate, config.steady_s)
            burst_rate = config.rate * config.burst_x
            _say(f"burst: {burst_rate:g} req/s for {config.burst_s:.0f} s")
            await send("burst", burst_rate, config.burst_s)
            burst_end = time.monotonic()
            _say(f"drain: waiting for lag 0 and every reply (at most {config.drain_timeout_s:.0f} s)")
            while time.monotonic() - burst_end < config.drain_timeout_s:
                await asyncio.sleep(config.sample_s)
                last = samples[-1] if samples else None
                at_rest = last is not None and last["t"] > burst_end - t0 and not any(last["lag"].values())
                if at_rest and tally.answered >= len(tally.sent):
                    drained_after_s = round(time.monotonic() - burst_end, 1)
                    break
            await asyncio.sleep(config.sample_s)  # one more sample at rest
            sampler.cancel()
            reader.cancel()
            for task in (sampler, reader):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            duplicates = client.duplicates
        await lag_consumer.stop()
        await admin.close()
    finally:
        await asyncio.gather(*(w.stop(timeout_s=30) for w in workers), return_exceptions=True)
        await stack.stop()

    # ----------------------------------------------------------------------------- summary
    steady_from = phases["steady"][0] + config.warmup_s
    steady_to = phases["steady"][1]
    rss_checks: dict[str, dict[str, float | None]] = {}
    for w in workers:
        series = [(s["t"], s["rss_mb"].get(w.name)) for s in samples if s["rss_mb"].get(w.name) is not None]
        steady = [mb for t, mb in series if steady_from <= t <= steady_to]
        late = [mb for t, mb in series if (steady_from + steady_to) / 2 <= t <= steady_to]
        rss_checks[w.name] = {
            "second_half_growth_mb": round(late[-1] - late[0], 1) if len(late) >= 2 else None,
            "after_warmup_mb": round(steady[0], 1) if steady else None,
            "end_of_steady_mb": round(steady[-1], 1) if steady else None,
            "max_mb": round(max(mb for _, mb in series), 1) if series else None,
            "end_mb": round(series[-1][1], 1) if series else None,
            "steady_growth_mb": round(steady[-1] - steady[0], 1) if len(steady) >= 2 else None,
        }
    max_lag = {t: max(s["lag"][t] for s in samples) for t in GROUP_TOPICS} if samples else {}
    missing = len(tally.sent) - tally.answered
    errors = sum(tally.errors.values())
    rss_ok = all(
        c["steady_growth_mb"] is not None and c["steady_growth_mb"] < config.rss_growth_mb
        for c in rss_checks.values()
    )
    verdict = {
        "all_answered": missing <= 0,
        "zero_errors": errors == 0,
        "lag_back_to_zero": drained_after_s is not None,
        "rss_flat": rss_ok,
    }
    latency = {
        phase: {
            "n": len(values),
            "p50_s": round(percentile(values, 50, method="nearest"), 4) if values else None,
            "p99_s": round(percentile(values, 99, method="nearest"), 4) if values else None,
            "mean_s": round(statistics.fmean(values), 4) if values else None,
        }
        for phase, values in tally.latencies.items()
    }
    result: dict[str, Any] = {
        **metadata("soak", command=command, started_at=started, wall_s=round(time.monotonic() - began, 1)),
        "machine": host_facts(loadavg_start=load_start, loadavg_end=loadavg()),
        "config": config.__dict__,
        "overrides": overrides or {},
        "backends": "emulated (devstack.tgi_emulator default service-time model, --max-batch-size 16)",
        "phases_s": phases,
        "sent": len(tally.sent),
        "answered": tally.answered,
        "missing": missing,
        "errors": tally.errors,
        "client_duplicates_dropped": duplicates,
        "max_lag": max_lag,
        "lag_zero_after_burst_s": drained_after_s,
        "rss": rss_checks,
        "latency": latency,
        "verdict": verdict,
        "passed": all(verdict.values()),
        "samples": samples,
    }
    return result


def summary(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"soak: {result['sent']} sent, {result['answered']} answered, errors {result['errors'] or 0}, "
        f"{result['client_duplicates_dropped']} duplicate replies dropped by the client",
        f"  steady {cfg['rate']:g} req/s x {cfg['steady_s']:.0f} s, "
        f"burst {cfg['rate'] * cfg['burst_x']:g} req/s x {cfg['burst_s']:.0f} s; "
        f"max lag {result['max_lag']}; lag 0 {result['lag_zero_after_burst_s']} s after the burst",
    ]
    for name, rss in result["rss"].items():
        lines.append(
            f"  {name} RSS: {rss['after_warmup_mb']} MB after warm-up -> {rss['end_of_steady_mb']} MB "
            f"at the end of steady ({rss['steady_growth_mb']:+} MB; second half of steady "
            f"{rss.get('second_half_growth_mb')} MB), max {rss['max_mb']} MB"
        )
    for phase, lat in result["latency"].items():
        lines.append(f"  {phase}: latency p50 {lat['p50_s']} s, p99 {lat['p99_s']} s ({lat['n']} replies)")
    lines.append(f"  verdict: {result['verdict']} -> {'PASS' if result['passed'] else 'FAIL'}")
    return "\n".join(lines)


def _set_overrides(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    from infra.settings import parse_overrides

    try:
        return parse_overrides(pairs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    defaults = SoakConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steady-s", type=float, default=defaults.steady_s, help="steady phase length")
    p.add_argument("--rate", type=float, default=defaults.rate, help="steady request rate (req/s)")
    p.add_argument(
        "--burst-x", type=float, default=defaults.burst_x, help="burst rate as a multiple of --rate"
    )
    p.add_argument("--burst-s", type=float, default=defaults.burst_s, help="burst phase length")
    p.add_argument("--workers", type=int, default=defaults.workers, help="echolm worker processes")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--warmup-s", type=float, default=defaults.warmup_s, help="RSS is judged after this")
    p.add_argument("--sample-s", type=float, default=defaults.sample_s, help="lag/RSS sampling interval")
    p.add_argument("--drain-timeout-s", type=float, default=defaults.drain_timeout_s)
    p.add_argument(
        "--rss-growth-mb", type=float, default=defaults.rss_growth_mb, help="allowed steady growth"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="settings override for the stack and workers (JSON value), e.g. routing.feedback_window=5000",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    p.add_argument("--data-dir", type=Path, default=None, help="stack data (default: a temporary folder)")
    args = p.parse_args(argv)
    config = SoakConfig(
        steady_s=args.steady_s,
        rate=args.rate,
        burst_x=args.burst_x,
        burst_s=args.burst_s,
        workers=args.workers,
        max_new_tokens=args.max_new_tokens,
        warmup_s=args.warmup_s,
        sample_s=args.sample_s,
        drain_timeout_s=args.drain_timeout_s,
        rss_growth_mb=args.rss_growth_mb,
    )
    command = "python -m bench.soak " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="echolm-soak-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        result = asyncio.run(
            run_soak(config, data_dir=data_dir, command=command, overrides=_set_overrides(args.set))
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    _say(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
