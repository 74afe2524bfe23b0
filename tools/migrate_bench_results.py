"""One-off: rewrite bench/results/**/*.json to one ``machine`` block and one set of metadata keys.

    python -m tools.migrate_bench_results            # rewrite in place (idempotent)
    python -m tools.migrate_bench_results --check    # exit 1 if a file still needs it

The shape is ``bench.hostfacts``'s (its docstring lists the keys): ``benchmark``, ``command``,
``started_at`` (ISO-8601 UTC), ``wall_s`` at the top, then ``machine`` with ``nproc``, ``cpu``,
``ram_gib``, ``platform``, ``python``, ``commit``, ``dirty``, ``dirty_files``, ``loadavg_start``,
``loadavg_end``. What an old file did not record becomes ``null``; nothing is invented. Numbers are
moved, never changed: every numeric leaf of a file is checked to survive the rewrite.

Old spellings it reads: the fleet's ``ram_gb`` (computed in GiB) and ``loadavg`` (taken when the run
ended), the soak's ``cpus``/``cpu_model``/``mem_gib`` and ``load_avg_at_start`` (in fact taken when
the run ended: ``machine()`` ran while the result was assembled), overhead's ``started`` and
``dirty_files``, selection-quality's ``dirty``, embed-speed's top-level ``bench``/``cores``/
``platform``/``python``/``loadavg_before``/``loadavg_after``, stack-timings'
``load_average_at_start``/``load_average_at_end``. gpu-calibration-h100.json is left as it is: its
``info`` describes the GPU host, which has no checkout (no commit) and another shape of facts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["main", "migrate"]

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SKIP = frozenset({"gpu-calibration-h100.json"})
META = ("benchmark", "command", "started_at", "wall_s")
MACHINE = (
    "nproc", "cpu", "ram_gib", "platform", "python", "commit", "dirty", "dirty_files",
    "loadavg_start", "loadavg_end",
)  # fmt: skip
OLD_TOP = ("bench", "cores", "platform", "python", "loadavg_before", "loadavg_after",
           "load_average_at_start", "load_average_at_end", "started")  # fmt: skip


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _benchmark(path: Path, data: dict[str, Any]) -> str:
    named = _first(data.get("benchmark"), data.get("bench"))
    if named is not None:
        return str(named).replace("_", "-")
    stem = path.stem
    for family in ("overhead", "fleet", "selection-quality", "soak", "stack-timings", "embed-speed"):
        if stem.startswith(family) or path.parent.name.startswith(family):
            return family
    if stem == "calibration":
        return "calibrate"
    raise ValueError(f"{path}: cannot tell which benchmark wrote it")


def _started_at(data: dict[str, Any]) -> str | None:
    value = _first(data.get("started_at"), data.get("started"))
    if value is None:
        return None
    if isinstance(value, int | float):
        moment = dt.datetime.fromtimestamp(value, tz=dt.UTC)
    else:
        text = str(value)
        moment = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        if moment.tzinfo is None:  # overhead wrote local time with %z; an empty %z means UTC here
            moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _machine(data: dict[str, Any]) -> dict[str, Any]:
    old = dict(data.get("machine") or {})
    if set(old) == set(MACHINE):
        return old
    dirty_files = old.get("dirty_files")
    dirty = _first(old.get("dirty"), None if dirty_files is None else bool(dirty_files))
    return {
        "nproc": _first(old.get("nproc"), old.get("cpus"), data.get("cores")),
        "cpu": _first(old.get("cpu"), old.get("cpu_model")),
        "ram_gib": _first(old.get("ram_gib"), old.get("ram_gb"), old.get("mem_gib")),
        "platform": _first(old.get("platform"), data.get("platform")),
        "python": _first(old.get("python"), data.get("python")),
        "commit": old.get("commit"),
        "dirty": dirty,
        "dirty_files": dirty_files,
        "loadavg_start": _first(
            old.get("loadavg_start"), data.get("loadavg_before"), data.get("load_average_at_start")
        ),
        "loadavg_end": _first(
            old.get("loadavg_end"),
            old.get("loadavg"),
            old.get("load_avg_at_start"),
            data.get("loadavg_after"),
            data.get("load_average_at_end"),
        ),
    }


def migrate(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` in the current shape: metadata first, then ``machine``, then the rest in its order."""
    meta = {
        "benchmark": _benchmark(path, data),
        "command": data.get("command"),
        "started_at": _started_at(data),
        "wall_s": data.get("wall_s"),
    }
    rest = {k: v for k, v in data.items() if k not in {*META, "machine", *OLD_TOP}}
    return {**meta, "machine": _machine(data), **rest}


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _check_numbers(path: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Every number survives (the started_at epoch of the fleet becomes its ISO form)."""
    lost = Counter(repr(x) for x in _numbers(before))  # repr: NaN equals NaN
    kept = Counter(repr(x) for x in _numbers(after))
    if isinstance(before.get("started_at"), int | float):
        lost[repr(float(before["started_at"]))] -= 1
    if +lost != +kept:
        raise ValueError(f"{path}: numbers changed in the rewrite ({len(lost)} before, {len(kept)} after)")


def _dump(data: dict[str, Any], like: str) -> str:
    second = like.split("\n", 2)[1] if "\n" in like else ""
    indent = len(second) - len(second.lstrip(" ")) or 1
    return json.dumps(data, indent=indent) + ("\n" if like.endswith("\n") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.migrate_bench_results", description=__doc__)
    parser.add_argument("--check", action="store_true", help="report files that need it; change nothing")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    pending: list[tuple[Path, str]] = []  # every file is checked before any is written
    for path in sorted(args.results.rglob("*.json")):
        if path.name in SKIP:
            continue
        text = path.read_text()
        data = json.loads(text)
        new = migrate(path, data)
        _check_numbers(path, data, new)
        if new != data or list(new) != list(data):
            pending.append((path, _dump(new, text)))
    for path, text in pending:
        if not args.check:
            path.write_text(text)
        sys.stderr.write(f"{'needs migration' if args.check else 'migrated'}: {path}\n")
    return 1 if args.check and pending else 0


if __name__ == "__main__":
    raise SystemExit(main())
