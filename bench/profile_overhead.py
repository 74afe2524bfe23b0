"""Run ``bench.overhead`` with py-spy attached to its worker during chosen phases: flame graphs.

    python -m bench.profile_overhead --out bench/results/profiles/small -- --preset small --pipeline-only
    python -m bench.profile_overhead --phase "steady@10=12" --phase "steady@50=25" -- --preset full

Each ``--phase NAME=SECONDS`` waits until the overhead bench starts the phase whose progress bar
begins with NAME (``steady@10``, ``steady@50``, ``saturation``), then runs ``py-spy record`` on the
worker process for SECONDS at ``--rate`` samples/s (``--nonblocking``: the worker is never paused,
so its timings are not disturbed by the sampler) and writes ``<out>/<name>.svg`` (functions, not
lines, so the file stays small). The worker is the bench's child whose command line runs
``echolm.cli``. ``attribute()`` turns an SVG into shares of the sampled CPU by the buckets in
``BUCKETS`` (by library: the leaf decides idle time, else the innermost specific library) and by
``CALLERS`` (by the part of the worker the sample serves), written beside it as ``<name>.json``.

py-spy is in the ``bench`` extra; it needs ptrace rights over the worker (root, or the same user
with ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["BUCKETS", "CALLERS", "attribute", "main"]

# (bucket, substrings of a frame "function (module)"); a sample goes to the first bucket that matches
# any of its frames, scanning from the innermost frame outwards.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "idle (selector wait, empty pool queue)",
        ("Selector.select (", "_worker (concurrent/futures/thread.py"),
    ),
    ("cross-thread wake-ups (call_soon_threadsafe)", ("_write_to_self",)),
    ("MiniLM encode (torch)", ("torch/", "sentence_transformers/", "transformers/")),
    ("MiniLM encode (onnxruntime)", ("onnxruntime/", "embedding_onnx")),
    ("tokenizer", ("tokenizers/",)),
    ("pymilvus + grpc (search, upsert, decode)", ("pymilvus/", "grpc/", "google/protobuf")),
    ("httpx / httpcore (backend calls, queue probe)", ("httpx/", "httpcore/", "h11/", "anyio/")),
    ("selection policy", ("agents/policy/retrieval", "agents/policy/prompt")),
    ("routing policy", ("agents/policy/routing",)),
    ("records, codecs, validation", ("streams/records", "streams/codecs", "orjson", "faust/models")),
    ("aiokafka (produce, fetch, protocol)", ("aiokafka/", "kafka/")),
    ("faust / mode (streams, agents)", ("faust/", "mode/")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("echolm agents", ("agents/",)),
    ("asyncio / uvloop event loop", ("asyncio/", "uvloop/", "selectors")),
)

# Which part of the worker a busy sample serves: the first entry with a frame on its stack wins.
CALLERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("maintenance: eviction scan", ("evict_once", "maintenance")),
    ("replay tick", ("replay",)),
    ("admit (log -> Milvus upsert)", ("admit",)),
    ("learn", ("learn",)),
    ("prepare: embed", ("SentenceTransformer", "OnnxEmbedder", "embedding.py", "embedding_onnx")),
    ("prepare: retrieve", ("MilvusExampleStore.search",)),
    ("prepare: parse, select, send", ("Preparer",)),
    ("serve: route, generate, emit", ("Server.",)),
    ("queue probe", ("TGIQueueProbe",)),
)

_FRAME = re.compile(
    r"<g><title>(.*?) \([\d,]+ samples?, [\d.]+%\)</title>"
    r'<rect [^>]*?y="([\d.]+)"[^>]*?fg:x="(\d+)" fg:w="(\d+)"'
)


_LEAF_ONLY = frozenset(name for name, _ in BUCKETS[:2])
_GENERIC = frozenset({"asyncio / uvloop event loop", "faust / mode (streams, agents)", "echolm agents"})


def _bucket(stack: Sequence[str]) -> str:
    """The bucket of a sample whose frames are ``stack`` (leaf first): idle and wake-ups by the leaf;
    else the innermost frame of a specific library (so a socket write of httpx is httpx's, not the
    loop's); else the innermost generic one (loop, faust, our agents)."""
    for group in ("leaf", "specific", "generic"):
        frames = stack[:1] if group == "leaf" else stack
        for name in frames:
            for bucket, keys in BUCKETS:
                wanted = (
                    bucket in _LEAF_ONLY
                    if group == "leaf"
                    else (bucket not in _LEAF_ONLY and (bucket in _GENERIC) == (group == "generic"))
                )
                if wanted and any(key in name for key in keys):
                    return bucket
    return "other"


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def find_worker(root: int) -> int | None:
    """The first descendant of ``root`` whose command line runs ``echolm.cli`` (the worker)."""
    queue = [root]
    while queue:
        pid = queue.pop(0)
        for child in _children(pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"echolm.cli" in cmdline and b"worker" in cmdline:
                return child
            queue.append(child)
    return None


def attribute(svg: Path) -> dict[str, Any]:
    """Shares of the sampled CPU by bucket (``BUCKETS``), from a py-spy (inferno) SVG.

    Every frame carries its depth (``y``) and its sample range (``fg:x``, ``fg:w``); a frame's self
    samples are its width minus its children's (the frames one level deeper inside its range), and
    are charged to the first bucket matching the frame or, failing that, one of its callers."""
    frames = [
        (float(y), int(x), int(w), html.unescape(name)) for name, y, x, w in _FRAME.findall(svg.read_text())
    ]
    if not frames:
        return {"samples": 0, "share_pct": {}}
    levels = sorted({f[0] for f in frames})
    total = max(f[2] for f in frames)
    root_first = any(f[0] == levels[0] and f[2] == total for f in frames)
    depth = {y: (i if root_first else len(levels) - 1 - i) for i, y in enumerate(levels)}
    by_depth: dict[int, list[tuple[int, int, str]]] = {}
    for y, x, w, name in frames:
        by_depth.setdefault(depth[y], []).append((x, w, name))

    def inside(d: int, x: int, w: int) -> list[tuple[int, int, str]]:
        return [f for f in by_depth.get(d, []) if x <= f[0] < x + w]

    buckets: dict[str, int] = {}
    callers: dict[str, int] = {}
    for d, row in by_depth.items():
        for x, w, name in row:
            own = w - sum(c[1] for c in inside(d + 1, x, w))
            if own <= 0:
                continue
            stack = [name] + [
                p[2] for k in range(d - 1, -1, -1) for p in by_depth.get(k, []) if p[0] <= x < p[0] + p[1]
            ]
            label = _bucket(stack)
            buckets[label] = buckets.get(label, 0) + own
            if label != BUCKETS[0][0]:
                caller = next(
                    (c for c, keys in CALLERS if any(k in n for n in stack for k in keys)),
                    "other (event loop, faust, aiokafka internals)",
                )
                callers[caller] = callers.get(caller, 0) + own
    ranked = sorted(buckets.items(), key=lambda kv: -kv[1])
    busy = total - buckets.get(BUCKETS[0][0], 0)
    return {
        "samples": total,
        "busy_samples": busy,
        "share_pct": {k: round(100 * v / total, 1) for k, v in ranked},
        "share_of_busy_pct": {k: round(100 * v / max(busy, 1), 1) for k, v in ranked if k != BUCKETS[0][0]},
        "busy_by_caller_pct": {
            k: round(100 * v / max(busy, 1), 1) for k, v in sorted(callers.items(), key=lambda kv: -kv[1])
        },
    }


def _record(pid: int, seconds: float, rate: int, out: Path) -> None:
    subprocess.run(
        ["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "--nonblocking",
         "--function", "-o", str(out), "-f", "flamegraph"],
        check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/profiles"), help="folder for SVG + JSON")
    p.add_argument("--phase", action="append", default=[], metavar="NAME=SECONDS")
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--attribute", nargs="+", type=Path, metavar="SVG", help="only attribute these SVGs; exit")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments of bench.overhead")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.attribute:
        for svg in args.attribute:
            print(svg, json.dumps(attribute(svg), indent=1))
        return 0
    phases = [
        (n, float(s)) for n, s in (p.split("=", 1) for p in args.phase or ["steady@10=12", "steady@50=25"])
    ]
    bench_args = [a for a in args.bench_args if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.overhead", *bench_args], stderr=subprocess.PIPE, text=False
    )
    assert proc.stderr is not None
    log = (args.out / "bench.log").open("wb")
    seen = bytearray()
    recorders: list[threading.Thread] = []
    pending = list(phases)
    while True:
        chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            break
        log.write(chunk)
        seen += chunk
        del seen[: max(0, len(seen) - 8192)]
        if pending and pending[0][0].encode() in seen:
            name, seconds = pending.pop(0)
            worker = find_worker(proc.pid)
            if worker is None:
                print(f"no worker found for {name}", file=sys.stderr)
                continue
            time.sleep(1.0)  # let the phase's rate settle
            svg = args.out / f"{name.replace('@', '-at-')}.svg"
            thread = threading.Thread(target=_record, args=(worker, seconds, args.rate, svg), daemon=True)
            thread.start()
            recorders.append(thread)
            seen.clear()
    code = proc.wait()
    for thread in recorders:
        thread.join()
    for svg in sorted(args.out.glob("*.svg")):
        svg.with_suffix(".json").write_text(json.dumps(attribute(svg), indent=1) + "\n")
    log.close()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
