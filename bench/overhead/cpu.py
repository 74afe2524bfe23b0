"""CPU accounting from /proc: machine busy time, this process tree's CPU by role, quiet-machine waits."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["cpu_delta", "cpu_per_reply", "cpu_snapshot", "settle", "wait_quiet"]


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


_ROLES = (("echolm.cli", "worker"), ("/bin/milvus", "milvus"), ("devstack.localstack", "milvus"),
          ("tansu", "broker"), ("devstack.tgi_dev", "backends"))  # fmt: skip


def _role(pid: int) -> str:
    if pid == os.getpid():
        return "client"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    return next((role for marker, role in _ROLES if marker in cmdline), "other")


def cpu_snapshot() -> dict[str, Any]:
    """Machine busy CPU seconds, and CPU seconds of this process tree by role (others share the cores)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = fields[3] + fields[4]
    roles: dict[str, float] = {}
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            role = _role(pid)
            roles[role] = roles.get(role, 0.0) + (int(parts[11]) + int(parts[12])) / tick  # utime+stime
    return {
        "busy_s": (sum(fields) - idle) / tick,
        "total_s": sum(fields) / tick,
        "ours_s": sum(roles.values()),
        "roles": roles,
    }


def cpu_delta(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Cores used over ``wall_s``: the whole machine, this process tree (by role) and everyone else."""
    busy = after["busy_s"] - before["busy_s"]
    ours = after["ours_s"] - before["ours_s"]
    wall = max(wall_s, 1e-9)
    roles = {r: (after["roles"].get(r, 0.0) - before["roles"].get(r, 0.0)) / wall for r in after["roles"]}
    return {
        "machine_busy_pct": 100 * busy / max(after["total_s"] - before["total_s"], 1e-9),
        "ours_cores": ours / wall,
        "others_cores": max(busy - ours, 0.0) / wall,
        "ours_by_role_cores": {r: round(v, 3) for r, v in sorted(roles.items())},
        "cores": os.cpu_count() or 1,
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
    }


def cpu_per_reply(cpu: dict[str, Any], wall_s: float, replies: int) -> dict[str, Any]:
    """Add CPU ms per reply (this process tree, and without the client) and the throughput that CPU
    cost would allow on ``cores`` dedicated cores: a projection, not a measurement."""
    if replies <= 0:
        return cpu
    per = {r: 1000 * c * wall_s / replies for r, c in cpu["ours_by_role_cores"].items()}
    total = sum(per.values())
    server = total - per.get("client", 0.0)
    return cpu | {
        "cpu_ms_per_reply": round(total, 3),
        "cpu_ms_per_reply_by_role": {r: round(v, 3) for r, v in per.items()},
        "projected_replies_per_s_on_all_cores_without_client": 1000 * cpu["cores"] / server
        if server
        else None,
    }


def settle(
    role: str, timeout_s: float, threshold_cores: float = 0.15, window_s: float = 3.0
) -> dict[str, float]:
    """Wait until our ``role`` processes go idle: after a bulk load Milvus compacts and re-indexes in
    the background for a while, and a run that overlaps it measures Milvus's housekeeping."""
    began = time.monotonic()
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        used = cpu_delta(before, cpu_snapshot(), window_s)["ours_by_role_cores"].get(role, 0.0)
        if used <= threshold_cores or time.monotonic() - began >= timeout_s:
            return {"role_cores": used, "waited_s": time.monotonic() - began}


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.5, window_s: float = 5.0) -> dict[str, float]:
    """Wait (up to ``max_wait_s``) until other processes use at most ``threshold_cores`` over a window."""
    began = time.monotonic()
    with tqdm(desc="waiting for a quiet machine", unit="check", disable=max_wait_s <= 0) as bar:
        while True:
            before = cpu_snapshot()
            time.sleep(window_s)
            load = cpu_delta(before, cpu_snapshot(), window_s)
            bar.set_postfix(others=f"{load['others_cores']:.2f}")
            bar.update()
            if load["others_cores"] <= threshold_cores or time.monotonic() - began >= max_wait_s:
                return {**load, "waited_s": time.monotonic() - began}
