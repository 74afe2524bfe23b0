"""Prefill and decode cost of Llama-style decoders on one GPU, for the emulator's service-time model.

    python3 -m bench.gpu_calibrate --out "$OUT/gpu-calibration.json"          # on the GPU machine
    python -m bench.gpu_calibrate --device cpu --tiny --out /tmp/gpu.json     # a 20 s smoke test here

Builds decoders with the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (GQA, RoPE, SwiGLU,
RMSNorm, 128k vocabulary) from random bf16 weights made directly on the device (timing does not
depend on the values), and times with CUDA events:

* **prefill**: one sequence of T tokens (128, 512, 2048, 4096), causal attention, KV written, logits
  for the last position only;
* **decode**: one step of B sequences (1 .. 64) each with C tokens already in a static KV cache
  (C = 512; also 2048 at B = 1 and 32), logits for every sequence.

Every shape is captured once as a CUDA graph and the graph is replayed (warm-up, then ``--repeats``
timed replays, median reported), so Python and launch overhead stay out, as they do in a serving
engine. The kernels are PyTorch's own (cuBLAS matmuls, SDPA attention; norms, RoPE and SwiGLU
unfused), so these are an upper bound on what TGI's fused kernels do; the weight-streaming limit is
reported beside each decode figure. Results are written after every model, so a timeout keeps what
was measured.

The emulator needs three numbers per model (``infra/tgi_emulator.py``): ``prefill_ms_per_token``
(the least-squares slope of prefill time over T), ``decode_ms_per_token`` (the step at B = 1) and
``batch_slowdown`` S, fitted to ``step(B) / step(1) = 1 + S (B - 1)`` over B <= 32. ``derived`` holds them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "ModelShape", "fit_batch_slowdown", "fit_prefill", "main"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 128_256
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * self.intermediate + 2 * d
        embeddings = self.vocab * d * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + d

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


MODELS: dict[str, ModelShape] = {
    "1B": ModelShape(
        "1B", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, tied_embeddings=True
    ),
    "3B": ModelShape(
        "3B", hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, tied_embeddings=True
    ),
    "8B": ModelShape("8B", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336),
}
TINY = ModelShape("tiny", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=1024)


# ------------------------------------------------------------------------------------------ fits (pure)
def fit_prefill(tokens: list[int], ms: list[float]) -> dict[str, float]:
    """Least-squares line ``ms = fixed_ms + ms_per_token * T``."""
    n = len(tokens)
    if n < 2:
        raise ValueError("need at least two prefill lengths to fit a line")
    mx, my = sum(tokens) / n, sum(ms) / n
    sxx = sum((t - mx) ** 2 for t in tokens)
    slope = sum((t - mx) * (y - my) for t, y in zip(tokens, ms, strict=True)) / sxx
    return {"ms_per_token": slope, "fixed_ms": my - slope * mx}


def fit_batch_slowdown(batches: list[int], ms: list[float]) -> float:
    """S in ``step(B) = step(1) * (1 + S (B - 1))``, least squares through the B = 1 point."""
    base = ms[batches.index(1)]
    xs = [b - 1 for b in batches if b > 1]
    ys = [m / base - 1 for b, m in zip(batches, ms, strict=True) if b > 1]
    if not xs:
        return 0.0
    return max(0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs))


# ------------------------------------------------------------------------------------------- the model
def _build(torch: Any, shape: ModelShape, device: str) -> dict[str, Any]:
    """Random bf16 weights, made on the device (no host-side init: an 8B model appears in a second)."""
    dtype = torch.bfloat16
    d, kv = shape.hidden, shape.kv_heads * shape.head_dim

    def w(*size: int) -> Any:
        return torch.randn(*size, device=device, dtype=dtype) * 0.02

    layers = [
        {
            "ln1": torch.ones(d, device=device, dtype=dtype),
            "wqkv": w(d, d + 2 * kv),
            "wo": w(d, d),
            "ln2": torch.ones(d, device=device, dtype=dtype),
            "wgu": w(d, 2 * shape.intermediate),
            "wdown": w(shape.intermediate, d),
        }
        for _ in range(shape.layers)
    ]
    embed = w(shape.vocab, d)
    head = embed if shape.tied_embeddings else w(shape.vocab, d)
    return {"layers": layers, "embed": embed, "head": head, "norm": torch.ones(d, device=device, dtype=dtype)}


def _rope_tables(torch: Any, head_dim: int, max_pos: int, device: str) -> tuple[Any, Any]:
    inv = 1.0 / (500_000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float32), inv)
    return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)


def _forward(
    torch: Any,
    F: Any,
    shape: ModelShape,
    weights: dict[str, Any],
    tokens: Any,
    cache: Any,
    start: int,
    rope: tuple[Any, Any],
    *,
    last_only: bool,
) -> Any:
    """One forward pass of ``tokens`` [B, T] at positions start..start+T-1; K/V go into ``cache``
    [layers, 2, B, kv_heads, max_len, head_dim]. Static Python ints only, so it is graph-capturable."""
    b, t = tokens.shape
    h, kvh, hd = shape.heads, shape.kv_heads, shape.head_dim
    cos, sin = (x[start : start + t].view(1, 1, t, hd // 2) for x in rope)

    def rotate(x: Any) -> Any:
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def rms(x: Any, weight: Any) -> Any:
        return F.rms_norm(x, (x.shape[-1],), weight, 1e-5)

    x = F.embedding(tokens, weights["embed"])
    for i, layer in enumerate(weights["layers"]):
        qkv = rms(x, layer["ln1"]) @ layer["wqkv"]
        q, k, v = qkv.split((h * hd, kvh * hd, kvh * hd), dim=-1)
        q = rotate(q.view(b, t, h, hd).transpose(1, 2))
        k = rotate(k.view(b, t, kvh, hd).transpose(1, 2))
        v = v.view(b, t, kvh, hd).transpose(1, 2)
        cache[i, 0, :, :, start : start + t] = k
        cache[i, 1, :, :, start : start + t] = v
        keys, values = cache[i, 0, :, :, : start + t], cache[i, 1, :, :, : start + t]
        attn = F.scaled_dot_product_attention(
            q, keys, values, is_causal=t > 1 and start == 0, enable_gqa=True
        )
        x = x + attn.transpose(1, 2).reshape(b, t, h * hd) @ layer["wo"]
        gate, up = (rms(x, layer["ln2"]) @ layer["wgu"]).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ layer["wdown"]
    if last_only:
        x = x[:, -1:]
    return rms(x, weights["norm"]) @ weights["head"].t()


def _time_graph(
    torch: Any, run: Callable[[], Any], *, warmup: int, repeats: int, graph: bool
) -> dict[str, float]:
    """Median, p10 and p90 in ms of ``run`` (captured as a CUDA graph when ``graph``)."""
    cuda = torch.cuda.is_available() and graph
    if cuda:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                out = run()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()
        replay: Callable[[], Any] = g.replay
    else:
        out = run()
        replay = run
    if not bool(torch.isfinite(out.float()).all()):
        raise RuntimeError("non-finite logits: the random model is numerically broken")
    for _ in range(warmup):
        replay()
    samples: list[float] = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        del g
    else:
        for _ in range(repeats):
            began = time.perf_counter()
            replay()
            samples.append((time.perf_counter() - began) * 1000.0)
    samples.sort()
    return {
        "ms": statistics.median(samples),
        "p10_ms": samples[int(0.1 * (len(samples) - 1))],
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
        "repeats": len(samples),
    }


def measure_model(
    shape: ModelShape,
    *,
    device: str,
    prefill_lengths: list[int],
    decode_batches: list[int],
    decode_context: int,
    long_context: int,
    repeats: int,
    bandwidth_gbs: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    graph = device.startswith("cuda")
    weights = _build(torch, shape, device)
    weight_bytes = shape.params * 2
    max_pos = max([*prefill_lengths, long_context + 1, decode_context + 1])
    rope = _rope_tables(torch, shape.head_dim, max_pos, device)
    result: dict[str, Any] = {
        "shape": asdict(shape) | {"head_dim": shape.head_dim},
        "params": shape.params,
        "weight_gb": weight_bytes / 1e9,
        "kv_bytes_per_token": shape.kv_bytes_per_token(),
        "prefill": [],
        "decode": [],
    }

    def forward_pass(
        weights: dict[str, Any], tokens: Any, cache: Any, start: int, *, last_only: bool
    ) -> Callable[[], Any]:
        """``_forward`` over these tensors as a no-argument call, for ``_time_graph`` to capture."""
        return lambda: _forward(torch, F, shape, weights, tokens, cache, start, rope, last_only=last_only)

    def cache_for(batch: int, length: int) -> Any:
        return torch.zeros(
            shape.layers,
            2,
            batch,
            shape.kv_heads,
            length,
            shape.head_dim,
            device=device,
            dtype=torch.bfloat16,
        )

    with torch.inference_mode():
        for t in prefill_lengths:
            cache = cache_for(1, t)
            tokens = torch.randint(0, shape.vocab, (1, t), device=device)
            timing = _time_graph(
                torch,
                forward_pass(weights, tokens, cache, 0, last_only=True),
                warmup=5,
                repeats=repeats,
                graph=graph,
            )
            flops = 2 * shape.params * t
            result["prefill"].append(
                {
                    "tokens": t,
                    **timing,
                    "ms_per_token": timing["ms"] / t,
                    "tflops": flops / timing["ms"] / 1e9,
                }
            )
            log(
                f"  {shape.name} prefill {t:5d} tokens: {timing['ms']:8.2f} ms "
                f"({timing['ms'] / t:.4f} ms/token)"
            )
            del cache
        points = [(b, decode_context) for b in decode_batches]
        points += [(b, long_context) for b in (1, 32) if long_context != decode_context]
        for batch, context in points:
            cache = cache_for(batch, context + 1)
            tokens = torch.randint(0, shape.vocab, (batch, 1), device=device)
            timing = _time_graph(
                torch,
                forward_pass(weights, tokens, cache, context, last_only=False),
                warmup=10,
                repeats=repeats,
                graph=graph,
            )
            moved = weight_bytes + batch * (context + 1) * shape.kv_bytes_per_token()
            result["decode"].append(
                {
                    "batch": batch,
                    "context": context,
                    **timing,
                    "bytes_moved_gb": moved / 1e9,
                    "bandwidth_limit_ms": moved / (bandwidth_gbs * 1e6),
                    "tokens_per_s": batch / timing["ms"] * 1000.0,
                }
            )
            log(f"  {shape.name} decode b={batch:3d} ctx={context:5d}: {timing['ms']:7.3f} ms/step")
            del cache
    del weights
    if graph:
        torch.cuda.empty_cache()
    prefill = result["prefill"]
    fit = fit_prefill([p["tokens"] for p in prefill], [p["ms"] for p in prefill]) if len(prefill) > 1 else {}
    at_context = [d for d in result["decode"] if d["context"] == decode_context and d["batch"] <= 32]
    step1 = next(d["ms"] for d in at_context if d["batch"] == 1)
    result["derived"] = {
        "prefill_ms_per_token": fit.get("ms_per_token", prefill[0]["ms_per_token"] if prefill else math.nan),
        "prefill_fixed_ms": fit.get("fixed_ms", 0.0),
        "decode_ms_per_token": step1,
        "batch_slowdown": fit_batch_slowdown([d["batch"] for d in at_context], [d["ms"] for d in at_context]),
        "decode_context": decode_context,
    }
    return result


def _device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_gb": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return info


def _copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s): the streaming ceiling."""
    import torch

    if not device.startswith("cuda"):
        return 50.0
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    event: Any = torch.cuda.Event  # untyped upstream (no-untyped-call under strict)
    times: list[float] = []
    for _ in range(10):
        start, end = event(enable_timing=True), event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * 2**30 / (statistics.median(times) / 1000.0) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_calibrate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="JSON file to write (rewritten after each model)"
    )
    parser.add_argument("--models", default="1B,8B,3B", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short lengths (smoke test)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--prefill", default="128,512,2048,4096", help="prompt lengths")
    parser.add_argument("--batches", default="1,4,8,16,32,64", help="decode batch sizes")
    parser.add_argument("--context", type=int, default=512, help="tokens in the KV cache during decode")
    parser.add_argument("--long-context", type=int, default=2048)
    parser.add_argument("--deadline-s", type=float, default=480.0, help="skip models not started by then")
    args = parser.parse_args(argv)

    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)

    shapes = [TINY] if args.tiny else [MODELS[m.strip()] for m in args.models.split(",") if m.strip()]
    prefill = [int(x) for x in args.prefill.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    context, long_context = args.context, args.long_context
    if args.tiny:
        prefill, batches, context, long_context = [16, 64], [1, 4, 8], 32, 32
    out: dict[str, Any] = {"method": __doc__, "info": _device_info(args.device), "models": {}, "errors": {}}
    bandwidth = _copy_bandwidth_gbs(args.device)
    out["info"]["copy_bandwidth_gbs"] = bandwidth
    log(f"device {out['info'].get('gpu', args.device)}; copy bandwidth {bandwidth:.0f} GB/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        if time.monotonic() - began > args.deadline_s:
            out["errors"][shape.name] = f"skipped: past the {args.deadline_s:.0f} s deadline"
            continue
        log(f"{shape.name}: {shape.params / 1e9:.2f} B parameters")
        try:
            out["models"][shape.name] = measure_model(
                shape,
                device=args.device,
                prefill_lengths=prefill,
                decode_batches=batches,
                decode_context=context,
                long_context=long_context,
                repeats=args.repeats if not args.tiny else 5,
                bandwidth_gbs=bandwidth,
                log=log,
            )
        except Exception as exc:  # noqa: BLE001 - keep the other models' numbers; the error is reported
            out["errors"][shape.name] = f"{type(exc).__name__}: {exc}"
            log(f"{shape.name} failed: {exc}")
        args.out.write_text(json.dumps(out, indent=1))
    out["elapsed_s"] = time.monotonic() - began
    args.out.write_text(json.dumps(out, indent=1))
    print("\nmodel  params  prefill ms/tok  decode ms b=1  b=8  b=32  batch_slowdown")
    for name, m in out["models"].items():
        by_batch = {d["batch"]: d["ms"] for d in m["decode"] if d["context"] == context}
        d = m["derived"]
        print(
            f"{name:5s} {m['params'] / 1e9:6.2f}B  {d['prefill_ms_per_token']:.4f}        "
            f"{d['decode_ms_per_token']:.3f}  {by_batch.get(8, math.nan):.3f}  "
            f"{by_batch.get(32, math.nan):.3f}  "
            f"{d['batch_slowdown']:.4f}"
        )
    if out["errors"]:
        print(f"errors: {out['errors']}")
    return 0 if out["models"] else 1


if __name__ == "__main__":
    sys.exit(main())
