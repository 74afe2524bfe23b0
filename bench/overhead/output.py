"""Markdown from an overhead result, and ``--compare``: one table row per earlier result file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.overhead.config import TIMING_STAGES

__all__ = ["compare", "markdown"]


def markdown(report: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float]) -> str:
        return f"| {name} | {s['p50']:.2f} | {s['p99']:.2f} |"

    lines = []
    for phase in [k for k in report if k.startswith("steady@")] + ["saturation"]:
        p = report.get(phase)
        if not p:
            continue
        m = p["worker_metrics_ms"]
        lines += [
            f"\n**{phase}** ({p['replies']} replies, {p['replies_per_s']:.1f} replies/s, errors "
            f"{dict(p['errors']) or 0}, embed batch mean {p['embed_batches']['mean']:.1f} / max "
            f"{p['embed_batches']['max']}; CPU: ours {p['cpu']['ours_cores']:.2f} cores, others "
            f"{p['cpu']['others_cores']:.2f} of {p['cpu']['cores']}; CPU ms/reply "
            f"{json.dumps(p['cpu'].get('cpu_ms_per_reply_by_role'))})\n",
            "| stage | p50 ms | p99 ms |", "| --- | ---: | ---: |",
            *(row(s, p["stages_ms"][s]) for s in TIMING_STAGES),
        ]  # fmt: skip
        if "emit" in m:
            lines.append(row("emit (worker histogram)", m["emit"]))
        lines += [
            row("unattributed (client hops, batch wait, emit)", p["unattributed_ms"]),
            row("**end to end (client)**", p["end_to_end_ms"]),
            row("**overhead = end to end - generate**", p["overhead_ms"]),
        ]
    micro_ = report.get("micro", {})
    if micro_:
        lines += [
            "\n| pure decision (µs) | p50 | p99 |", "| --- | ---: | ---: |",
            row("select_examples (20 hits)", micro_["select_examples_us"]),
            row("context_features + expected + choose_backend", micro_["route_us"]),
        ]  # fmt: skip
    if "direct" in report:
        lines.append(f"\ndirect client -> backend: {json.dumps(report['direct']['latency_ms'])}")
    embed = {k: v for k, v in report.get("embed_batching", {}).items() if k != "cpu"}
    if embed:
        lines += ["\n| MiniLM ms/sentence | batch 1 | batch 16 | batch 32 |", "| --- | ---: | ---: | ---: |"]
        lines += [
            f"| {k} | {v['batch_1']:.1f} | {v['batch_16']:.1f} | {v['batch_32']:.1f} |"
            for k, v in embed.items()
        ]
    floor = report.get("fetch_wait_floor_ms", {})
    if floor:
        lines += ["\n| consumer fetch_max_wait_ms | hop p50 ms | hop max ms |", "| ---: | ---: | ---: |"]
        lines += [f"| {k} | {v['p50']:.1f} | {v['max']:.1f} |" for k, v in floor.items()]
    lines += floors_markdown(report) + summary_markdown(report)
    return "\n".join(lines)


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def floors_markdown(report: dict[str, Any]) -> list[str]:
    """The floors phase: each component alone, p50 / p99 ms."""
    floors = report.get("floors")
    if not floors:
        return []
    lines = ["\n| floor (component alone) | p50 ms | p99 ms |", "| --- | ---: | ---: |"]
    for kind in ("embed_ms", "retrieve_ms"):
        lines += [
            f"| {kind.removesuffix('_ms')}, batch {b} | {v['p50']:.1f} | {v['p99']:.1f} |"
            for b, v in floors[kind].items()
        ]
    for kind in ("kafka_hop_ms", "generate_ms"):
        lines.append(
            f"| {kind.removesuffix('_ms')} | {floors[kind]['p50']:.1f} | {floors[kind]['p99']:.1f} |"
        )
    return lines


def summary_markdown(report: dict[str, Any]) -> list[str]:
    """Medians over the runs, per variant and phase, with stage/floor ratios and the peer ratio."""
    summary = report.get("summary")
    if not summary:
        return []
    peer = summary.get("peer", {})
    lines = [
        "\n| variant | phase | runs | overhead p50 / p99 ms | replies/s | overhead / peer p50 "
        "| overhead / sum of floors | stage / floor p50 | CPU ms/reply (worker, milvus, broker) | load 1m |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for variant, phases in summary.items():
        for phase, c in phases.items():
            mine, theirs = c.get("overhead_p50_ms"), peer.get(phase, {}).get("overhead_p50_ms")
            vs_peer = _num(mine / theirs, 2) if variant != "peer" and mine and theirs else "-"
            ratios = ", ".join(f"{k} {v:.1f}x" for k, v in c.get("ratio_p50", {}).items() if v is not None)
            cpu = ", ".join(_num(c["cpu_ms_per_reply"].get(r)) for r in ("worker", "milvus", "broker"))
            lines.append(
                f"| {variant} | {phase} | {c['runs']} | {_num(mine)} / {_num(c.get('overhead_p99_ms'))} "
                f"| {_num(c.get('replies_per_s'))} | {vs_peer} | {_num(c.get('overhead_over_floors'), 2)} "
                f"| {ratios or '-'} | {cpu} | {_num(c.get('loadavg_1m'))} |"
            )
    return lines


def compare(paths: Sequence[Path]) -> str:
    """One row per result file: the settings it changed and its headline numbers (Markdown)."""

    def cell(phase: dict[str, Any] | None, key: str) -> str:
        if not phase or not phase.get(key, {}).get("n"):
            return "-"
        return f"{phase[key]['p50']:.0f} / {phase[key]['p99']:.0f}"

    lines = [
        "| run | changed | overhead p50 / p99 ms @ low rate | replies/s @ rate "
        "| overhead p50 / p99 ms @ rate | saturation replies/s "
        "| CPU ms/reply (worker, milvus, broker, client) | other load (cores) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for path in paths:
        r = json.loads(Path(path).read_text())
        if "steady" in r:  # files written before the low-rate phase existed
            old = r.pop("steady")
            r[f"steady@{old['rate']:g}"] = old
        steady = sorted((k for k in r if k.startswith("steady@")), key=lambda k: float(k.split("@")[1]))
        low, high = (r[steady[0]] if len(steady) > 1 else None), (r[steady[-1]] if steady else None)
        sat = r.get("saturation", {})
        busiest = max([sat, high or {}], key=lambda p: p.get("replies", 0))
        by_role = busiest.get("cpu", {}).get("cpu_ms_per_reply_by_role", {})
        cpu = ", ".join(f"{by_role.get(k, 0):.1f}" for k in ("worker", "milvus", "broker", "client"))
        changed = [f"{s}.{k}={v}" for s, kv in r.get("overrides", {}).items() for k, v in kv.items()]
        if r.get("fetch_max_wait_ms") is not None:
            changed.append(f"fetch_max_wait_ms={r['fetch_max_wait_ms']}")
        others = [r[k]["cpu"]["others_cores"] for k in [*steady, "saturation"] if k in r]
        lines.append(
            f"| {Path(path).stem} | {'<br>'.join(changed) or 'defaults'} | {cell(low, 'overhead_ms')} "
            f"| {high['replies_per_s']:.1f} of {high['rate']:g} | {cell(high, 'overhead_ms')} "
            f"| {sat.get('replies_per_s', float('nan')):.1f} | {cpu} | {np.mean(others):.2f} |"
            if high
            else f"| {Path(path).stem} | incomplete | | | | | | |"
        )
    return "\n".join(lines)
