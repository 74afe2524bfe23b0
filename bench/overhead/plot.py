"""``--plot``: per-stage p50/p99 overhead of result files, one PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_stages"]

_PLOT_STAGES = ("embed", "retrieve", "select", "kafka_hop", "handoff", "route", "emit", "unattributed")


def plot_stages(results: Sequence[Path], out: Path) -> Path:
    """Per-stage p50 and p99 overhead (ms, log scale) per phase of each result file: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, dict[str, tuple[float, float]]]] = []
    for path in results:
        r = json.loads(path.read_text())
        for phase in ("steady@5", "steady@10", "steady@50", "saturation"):
            ph = r.get(phase)
            if not ph:
                continue
            stages: dict[str, tuple[float, float]] = {}
            for name in _PLOT_STAGES:
                if name == "emit":
                    d = ph.get("worker_metrics_ms", {}).get("emit")
                elif name == "unattributed":
                    d = ph.get("unattributed_ms")
                else:
                    d = ph.get("stages_ms", {}).get(name)
                if d and d.get("p50") is not None:
                    stages[name] = (float(d["p50"]), float(d["p99"]))
            rows.append((f"{path.stem}\n{phase} ({ph.get('replies_per_s', 0):.1f} replies/s)", stages))
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.75 * len(rows) * 1.0 + 1.5))
    height = 0.8 / len(_PLOT_STAGES)
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(_PLOT_STAGES):
        ys = [j + i * height for j in range(len(rows))]
        p50 = [stages.get(name, (0.0, 0.0))[0] for _, stages in rows]
        p99 = [stages.get(name, (0.0, 0.0))[1] for _, stages in rows]
        ax.barh(ys, p99, height=height, color=colours(i), alpha=0.3)
        ax.barh(ys, p50, height=height, color=colours(i), label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per request (solid: p50, pale: p99; log scale)")
    ax.set_title("echolm pipeline overhead per stage (instant emulated backends)")
    ax.axvline(15, color="grey", ls="--", lw=0.8)
    ax.text(15, len(rows) - 0.25, " target p50 15 ms", fontsize=7, color="grey")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
