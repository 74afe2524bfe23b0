"""Fleet benchmark results: per-request records, aggregation, comparisons, plots, Markdown.

    echolm bench report                                  # plots + tables from bench/results/fleet-small.json
    echolm bench report --result bench/results/fleet-full.json --plots docs/plots

Everything above ``plot_*`` is pure (no I/O, no clock) and unit-tested: ``RequestResult`` is one
request as a system served it, ``summarize`` turns a system's records into ``SystemSummary``,
``timeline`` bins them over time, ``headline`` computes the ratios BENCHMARKS.md quotes.

Modules, one concern each: ``records`` (``RequestResult``, reading a result and its records),
``summary`` (per-system aggregation), ``sensitivity`` (re-scoring with other quality tables),
``headline`` (timelines and the ratios BENCHMARKS.md quotes), ``plots`` (PNGs), ``tables``
(Markdown tables, section markers) and ``sections`` (the BENCHMARKS.md sections).

    python -m bench.report [--preset P] [--result F] [--plots DIR] [--update-benchmarks]
                                                         # the same as ``echolm bench report``
"""

from __future__ import annotations

from bench.report.headline import headline, interpolate_at, timeline
from bench.report.plots import render_plots
from bench.report.records import RequestResult, load_result
from bench.report.sections import baselines_section, calibration_section, sensitivity_lines, update_benchmarks
from bench.report.sensitivity import SMALL_MATCH_SENSITIVITY, parity_verdict, quality_sensitivity
from bench.report.summary import SystemSummary, requality, summaries_to_json, summarize, sustained_rate
from bench.report.tables import markdown_tables, replace_section
from bench.stats import percentile

__all__ = [
    "SMALL_MATCH_SENSITIVITY",
    "RequestResult",
    "SystemSummary",
    "baselines_section",
    "calibration_section",
    "headline",
    "interpolate_at",
    "load_result",
    "markdown_tables",
    "parity_verdict",
    "percentile",
    "quality_sensitivity",
    "render_plots",
    "replace_section",
    "requality",
    "sensitivity_lines",
    "summaries_to_json",
    "summarize",
    "sustained_rate",
    "timeline",
    "update_benchmarks",
]
