"""Markdown building blocks: number formatting, the per-phase system tables, section markers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["fmt", "fmt_x", "markdown_tables", "replace_section"]


def fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown_tables(result: Mapping[str, Any]) -> str:
    """The per-system tables (one per phase) of a fleet result JSON."""
    lines: list[str] = []
    for phase, systems in result["summaries"].items():
        lines += [
            f"**{phase}** ({result['phases'][phase]['description']})",
            "",
            "| system | sustained (req/s) | completed / makespan (req/s) | p50 (s) | p99 (s) | "
            "win rate vs large (95% CI) | offload | completed | overhead p50 (ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in systems.items():
            lo, hi = s["quality_ci"]
            lines.append(
                f"| {name} | {fmt(s['sustained_rps'], '.2f')} | {fmt(s['throughput_rps'], '.2f')} "
                f"| {fmt(s['latency_p50_s'])} | "
                f"{fmt(s['latency_p99_s'])} | {fmt(s['quality'], '.3f')} "
                f"({fmt(lo, '.3f')}-{fmt(hi, '.3f')}) | "
                f"{fmt(s['offload_ratio'], '.0%')} | {s['completed']}/{s['requests']} | "
                f"{fmt(s['overhead_p50_ms'], '.0f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with everything between ``<!-- section:NAME:start -->`` and ``...:end -->`` replaced by
    ``body``; raises if the markers are missing (never appends a second copy)."""
    start, end = f"<!-- section:{name}:start -->", f"<!-- section:{name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"BENCHMARKS.md has no {start} ... {end} markers")
    return text[: i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]


def fmt_x(value: float) -> str:
    return fmt(value, ".2f") + "x"
