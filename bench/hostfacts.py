"""What a benchmark ran on and when: one ``machine`` block and one set of metadata keys for every result.

Every result file under bench/results/ carries the same ``machine`` block (``host_facts``)::

    nproc          cores this process may use (sched_getaffinity; os.cpu_count elsewhere)
    cpu            CPU model name ("" when unknown)
    ram_gib        total RAM, GiB
    platform       platform.platform(), or None where an old run did not record it
    python         Python version
    commit         short git commit, or None where not recorded
    dirty          tracked files modified at the time (bool), or None where not recorded
    dirty_files    those files, or None where not recorded
    loadavg_start  1/5/15-minute load average when the run started, or None
    loadavg_end    the same when it ended, or None

and the same top-level metadata keys (``metadata``): ``benchmark`` (its name), ``command`` (how to
rerun it), ``started_at`` (ISO-8601, UTC) and ``wall_s``. Older files were rewritten to this shape
by tools/migrate_bench_results.py, numbers unchanged.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MACHINE_KEYS", "host_facts", "iso_utc", "loadavg", "metadata"]

MACHINE_KEYS = (
    "nproc", "cpu", "ram_gib", "platform", "python", "commit", "dirty", "dirty_files",
    "loadavg_start", "loadavg_end",
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def loadavg() -> list[float]:
    """The 1/5/15-minute load average now (two decimals)."""
    return [round(x, 2) for x in os.getloadavg()]


def host_facts(
    *, loadavg_start: Sequence[float] | None = None, loadavg_end: Sequence[float] | None = None
) -> dict[str, Any]:
    """The ``machine`` block: cores, CPU, RAM, platform, Python, commit (with the dirty files), and the
    load averages the caller took (pass ``loadavg()`` at the start and/or the end of its run)."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if "model name" in line
        ),
        platform.processor() or platform.machine(),
    )
    mem_kib = next(
        (
            int(line.split()[1])
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 0
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty_files = None if status is None else [line[3:] for line in status.splitlines() if line]
    return {
        "nproc": cores,
        "cpu": cpu,
        "ram_gib": round(mem_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit.strip() if commit is not None else None,
        "dirty": None if dirty_files is None else bool(dirty_files),
        "dirty_files": dirty_files,
        "loadavg_start": list(loadavg_start) if loadavg_start is not None else None,
        "loadavg_end": list(loadavg_end) if loadavg_end is not None else None,
    }


def iso_utc(epoch_s: float) -> str:
    """``epoch_s`` as ISO-8601 UTC to the second, e.g. ``2026-12-04T18:29:24Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def metadata(
    benchmark: str, *, command: str | None, started_at: float, wall_s: float | None
) -> dict[str, Any]:
    """The top-level metadata keys every result carries (``started_at`` is a ``time.time()``)."""
    return {"benchmark": benchmark, "command": command, "started_at": iso_utc(started_at), "wall_s": wall_s}
