"""Prefill cost on the GPU with per-sequence causal attention (the flash kernel), beside the replay
engine's packed pass with a dense block-diagonal mask, in the same call (issue 12).

    python3 -m bench.gpu_prefill --out $OUT/gpu-prefill.json                # on the device
    python -m bench.gpu_prefill --device cpu --tiny --out /tmp/p.json      # smoke test here

Why. ``devstack.batching``'s prefill fit (0.027 ms per token for the 0.5B shape) comes from
``bench.gpu_replay.Engine.prefill``: one packed pass whose attention materialises a T x T mask, so its
cost grows with the square of the packed tokens. TGI prefills with flash attention over variable-length
sequences, whose cost per token is nearly flat. In-context examples make a small-tier prompt 3-5x
longer, so this slope decides what examples cost; it must be measured, not assumed.

What runs: ``Engine`` (random bf16 weights, the Qwen2.5 0.5B/1.5B shapes) and, per pack of new
sequences (counts x lengths from the fleet's prompts: 1-16 sequences of 128-1,024 tokens), the median
of 7 timed passes (after 3 warm-ups) of (a) ``Engine.prefill`` (masked, packed) and (b) the same
layers with attention computed per sequence by ``scaled_dot_product_attention(is_causal=True)``,
forced onto PyTorch's flash kernel (bf16, H100/H200; left to choose, PyTorch may take cuDNN
attention, which builds a plan per new sequence length). Both write the KV cache and take
the first token of each sequence. Fitted per variant: ``fixed_ms + ms_per_token x tokens``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.gpu_replay import SHAPES, TINY, Engine
from devstack.batching import fit_line

PACKS = [(n, length) for n in (1, 2, 4, 8, 16) for length in (128, 256, 512, 1024)]


def prefill_flash(engine: Engine, first_row: int, lengths: list[int]) -> list[int]:
    """``Engine.prefill`` with attention per sequence (causal, no mask tensor) on the flash kernel.
    Calls the class's method: ``bench.gpu_replay --prefill flash`` puts this function in place of the
    instance's ``prefill``."""
    with _flash_only(engine):
        return Engine.prefill(engine, first_row, lengths, per_sequence=True)


def _flash_only(engine: Engine) -> Any:
    """The flash kernel only on a GPU: PyTorch may otherwise pick cuDNN attention, which builds a plan
    per new sequence length (milliseconds each, every length a new one in a replay)."""
    import contextlib

    if not engine.device.startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def _time(engine: Engine, fn: Any, lengths: list[int]) -> float:
    torch = engine.torch
    for _ in range(3):
        fn(0, lengths)
    times = []
    for _ in range(7):
        if engine.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(0, lengths)  # returns host tokens: synchronises
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure(name: str, device: str, tiny: bool) -> dict[str, Any]:
    shape = TINY if tiny else SHAPES[name]
    engine = Engine(shape, device=device, max_len=1024 + 256, rows=16)
    rows = []
    for n, length in PACKS:
        lengths = [length] * n
        masked = _time(engine, engine.prefill, lengths)
        flash = _time(engine, lambda first, ls: prefill_flash(engine, first, ls), lengths)
        rows.append(
            {"sequences": n, "length": length, "tokens": n * length, "masked_ms": masked, "flash_ms": flash}
        )
        print(f"{name} {n} x {length}: masked {masked:.2f} ms, flash {flash:.2f} ms", flush=True)
    return {"shape": shape.name, "rows": rows, "fits": fits_of(rows)}


def fits_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``fixed_ms + ms_per_token x tokens`` per variant; the masked pass only over packs of at most
    4,096 tokens (TGI's fallback prefill budget, the packs the replay ran), where it is still near
    linear: past that its T x T mask makes it quadratic."""
    fits = {}
    for key, cap in (("masked_ms", 4096), ("flash_ms", None)):
        use = [r for r in rows if cap is None or r["tokens"] <= cap]
        fixed, slope = fit_line([r["tokens"] for r in use], [r[key] for r in use])
        fits[key] = {"ms_per_token": slope, "fixed_ms": fixed, "packs": len(use)}
    return fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, for a CPU smoke test")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    result: dict[str, Any] = {
        "what": "bench.gpu_prefill: packed masked prefill vs per-sequence causal (flash) prefill",
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "models": {},
    }
    for name in args.models.split(","):
        result["models"][name] = measure(name, args.device, args.tiny)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
