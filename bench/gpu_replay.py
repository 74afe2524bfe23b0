"""Real continuous batching of random-weight Qwen2.5-shaped decoders on one GPU, replaying the fleet.

    python3 -m bench.gpu_replay --trace bench/results/gpu-replay-trace.json --out $OUT/gpu-replay.json
    python -m bench.gpu_replay --device cpu --tiny --loads 0.5 -n 40 --out /tmp/r.json   # smoke test here

What runs (no TGI on the GPU machine, no network: this is a small engine of its own):

* **Models**: Qwen2 decoders with the Qwen2.5-0.5B and 1.5B shapes (hidden 896/1536, 24/28 layers,
  14/12 query heads, 2 KV heads, SwiGLU 4864/8960, QKV bias, RoPE theta 1e6, tied 151,936-token
  embeddings), random bf16 weights made on the device (timing does not depend on the values).
* **KV cache**: static, one row per running sequence ([layers, 128 rows, 2 heads, max_len, head_dim]).
  Running sequences occupy rows 0..n-1; a finished row is refilled by moving the last row into it.
* **Decode**: one step of all n running sequences, captured as a CUDA graph per (batch bucket,
  context bucket): batches are padded up to the next of 1, 2, 4, 8, 16, 24, ..., 128 (TGI pads to its
  CUDA-graph sizes too) and attention reads the cache up to the next multiple of 256 positions past
  the longest running sequence. Greedy argmax in the graph; the tokens come back to the host after
  every step (the engine synchronises every step, as a server streaming tokens does).
* **Prefill**: eager, every new request of a step packed into one pass (block-diagonal causal mask),
  its K/V scattered into the requests' rows, the first token from each request's last position.
* **Scheduling**: ``devstack.batching.BatchScheduler`` with TGI's launcher defaults, on the wall clock.

Measured, per model: the decode step time of this engine at every batch bucket (context 512), the
prefill time over packed token counts (fitted to ``fixed_ms + ms_per_token x tokens``), then a replay
of the fleet trace at several loads (fractions of a nominal capacity computed from those
measurements), recording every request's time to first token and end-to-end latency and every step.
``devstack.batching.simulate`` of the same jobs, with this engine's measured table and with the notes'
table (gpu-qwen-h200.md), goes beside each load (``bench.replay_trace.compare``). Results are written
after every load, so a timeout keeps what was measured.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from devstack.batching import (
    BatchLimits,
    BatchScheduler,
    Job,
    Outcome,
    ServiceModel,
    fit_line,
)

__all__ = ["BUCKETS", "SHAPES", "Engine", "QwenShape", "measure", "nominal_capacity", "replay"]

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128)
CONTEXT_STEP = 256


@dataclass(frozen=True, slots=True)
class QwenShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 151_936

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = d * (d + 2 * kv) + (d + 2 * kv) + d * d + 3 * d * self.intermediate + 2 * d
        return self.layers * per_layer + self.vocab * d + d  # tied embeddings


SHAPES = {
    "qwen2.5-0.5b": QwenShape("qwen2.5-0.5b", 896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": QwenShape("qwen2.5-1.5b", 1536, 28, 12, 2, 8960),
}
TINY = QwenShape("tiny", 128, 2, 4, 2, 256, vocab=512)


def nominal_capacity(model: ServiceModel, jobs: Sequence[Job], batch: int = 128, pack: int = 4) -> float:
    """Requests per second one replica serves with ``batch`` sequences always running and prefills of
    ``pack`` requests: a yardstick for choosing loads, not a measurement."""
    new = statistics.fmean(j.max_new_tokens for j in jobs)
    prompt = statistics.fmean(j.prompt_tokens for j in jobs)
    per_request_s = (
        new * model.decode_ms(batch) / batch
        + prompt * model.prefill_ms_per_token
        + model.prefill_fixed_ms / pack
    ) / 1000
    return 1.0 / per_request_s


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """One model, its static KV cache, its decode graphs and a packed prefill."""

    def __init__(self, shape: QwenShape, *, device: str, max_len: int, rows: int = BUCKETS[-1]) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F, self.shape, self.device = torch, F, shape, device
        self.max_len, self.rows = max_len, rows
        torch.manual_seed(0)
        dt = torch.bfloat16
        d, hd, kvh, h = shape.hidden, shape.head_dim, shape.kv_heads, shape.heads
        qkv = (h + 2 * kvh) * hd

        def w(*size: int) -> Any:
            return torch.randn(*size, device=device, dtype=dt) * 0.02

        self.layers = [
            {
                "ln1": torch.ones(d, device=device, dtype=dt),
                "wqkv": w(d, qkv),
                "bqkv": w(qkv),
                "wo": w(h * hd, d),
                "ln2": torch.ones(d, device=device, dtype=dt),
                "wgu": w(d, 2 * shape.intermediate),
                "wdown": w(shape.intermediate, d),
            }
            for _ in range(shape.layers)
        ]
        self.embed, self.norm = w(shape.vocab, d), torch.ones(d, device=device, dtype=dt)
        inv = 1.0 / (1e6 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv)
        self.cos, self.sin = ang.cos().to(dt), ang.sin().to(dt)
        cache = (shape.layers, rows, kvh, max_len, hd)
        self.k = torch.zeros(cache, device=device, dtype=dt)
        self.v = torch.zeros(cache, device=device, dtype=dt)
        self.tok = torch.zeros(rows, device=device, dtype=torch.long)
        self.pos = torch.zeros(rows, device=device, dtype=torch.long)
        self.out = torch.zeros(rows, device=device, dtype=torch.long)
        self.graphs: dict[tuple[int, int], Any] = {}
        self.pool: Any = None

    # ---- math
    def _rope(self, x: Any, pos: Any) -> Any:  # x [..., N, hd] with pos broadcastable to N
        half = self.shape.head_dim // 2
        cos, sin = self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2)
        x1, x2 = x[..., :half], x[..., half:]
        return self.torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _mlp(self, x: Any, layer: dict[str, Any]) -> Any:
        F = self.F
        gate, up = (F.rms_norm(x, (x.shape[-1],), layer["ln2"], 1e-6) @ layer["wgu"]).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ layer["wdown"]

    def _qkv(self, x: Any, layer: dict[str, Any], pos: Any) -> tuple[Any, Any, Any]:
        s = self.shape
        hd, h, kvh = s.head_dim, s.heads, s.kv_heads
        qkv = self.F.rms_norm(x, (x.shape[-1],), layer["ln1"], 1e-6) @ layer["wqkv"] + layer["bqkv"]
        q, k, v = qkv.split((h * hd, kvh * hd, kvh * hd), dim=-1)
        n = x.shape[0]
        return self._rope(q.view(n, h, hd), pos), self._rope(k.view(n, kvh, hd), pos), v.view(n, kvh, hd)

    def _decode(self, b: int, ctx: int) -> None:
        """Rows 0..b-1: one token each at ``pos``; attention over cache positions < ctx."""
        torch, F, s = self.torch, self.F, self.shape
        rows, pos = torch.arange(b, device=self.device), self.pos[:b]
        x = F.embedding(self.tok[:b], self.embed)
        mask = (torch.arange(ctx, device=self.device)[None, :] <= pos[:, None]).view(b, 1, 1, ctx)
        g = s.heads // s.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, pos)
            self.k[i, rows, :, pos] = k
            self.v[i, rows, :, pos] = v
            # GQA as a batch of kv heads, each with its g query heads as the "query length".
            attn = F.scaled_dot_product_attention(
                q.view(b, s.kv_heads, g, s.head_dim),
                self.k[i, :b, :, :ctx],
                self.v[i, :b, :, :ctx],
                attn_mask=mask,
            )
            x = self._mlp(x + attn.reshape(b, s.heads * s.head_dim) @ layer["wo"], layer)
        logits = F.rms_norm(x, (x.shape[-1],), self.norm, 1e-6) @ self.embed.t()
        self.out[:b] = logits.argmax(-1)

    def capture(self, log: Callable[[str], None]) -> None:
        torch = self.torch
        if not self.device.startswith("cuda"):
            return
        began = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        for ctx in range(CONTEXT_STEP, self.max_len + 1, CONTEXT_STEP):
            for b in BUCKETS:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._decode(b, ctx)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    self._decode(b, ctx)
                self.graphs[(b, ctx)] = g
        torch.cuda.synchronize()
        log(f"  {self.shape.name}: {len(self.graphs)} decode graphs in {time.perf_counter() - began:.1f} s")

    # ---- steps (host side: lists of per-row tokens and positions)
    def decode_step(self, toks: list[int], positions: list[int]) -> list[int]:
        n = len(toks)
        b = next(x for x in BUCKETS if x >= n)
        ctx = -(-(max(positions) + 1) // CONTEXT_STEP) * CONTEXT_STEP
        pad = b - n
        self.tok[:b].copy_(self.torch.tensor(toks + [0] * pad), non_blocking=True)
        self.pos[:b].copy_(self.torch.tensor(positions + [0] * pad), non_blocking=True)
        if self.graphs:
            self.graphs[(b, ctx)].replay()
        else:
            self._decode(b, ctx)
        return list(self.out[:n].tolist())

    def prefill(self, first_row: int, lengths: list[int], *, per_sequence: bool = False) -> list[int]:
        """Packed prefill of len(lengths) new sequences into rows first_row, first_row+1, ...;
        returns each one's first token. Attention: one pass over the pack with a block-diagonal causal
        mask, or, ``per_sequence``, one causal call per sequence with no mask tensor (TGI's kind;
        ``bench/gpu_prefill.py`` runs it on the flash kernel)."""
        torch, F, s = self.torch, self.F, self.shape
        dev = self.device
        t = sum(lengths)
        seq = torch.repeat_interleave(
            torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev)
        )
        starts = torch.tensor([0, *lengths[:-1]], device=dev).cumsum(0)
        pos = torch.arange(t, device=dev) - starts[seq]
        rows = seq + first_row
        tokens = torch.randint(0, s.vocab, (t,), device=dev)
        bounds = [0, *itertools.accumulate(lengths)]
        causal = None if per_sequence else (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, pos)
            self.k[i, rows, :, pos] = k
            self.v[i, rows, :, pos] = v
            attn = self._attend(q, k, v, causal, bounds)
            x = self._mlp(x + attn.reshape(t, s.heads * s.head_dim) @ layer["wo"], layer)
        last = torch.tensor(lengths, device=dev).cumsum(0) - 1
        logits = F.rms_norm(x[last], (x.shape[-1],), self.norm, 1e-6) @ self.embed.t()
        return list(logits.argmax(-1).tolist())

    def _attend(self, q: Any, k: Any, v: Any, causal: Any, bounds: list[int]) -> Any:
        """Prefill attention over a pack ([tokens, heads, head_dim] each; GQA by repeating K/V): one
        pass with the block-diagonal ``causal`` mask, or, when it is None, one causal call per
        sequence (``bounds``: where each starts, then the end)."""
        F, g = self.F, self.shape.heads // self.shape.kv_heads
        if causal is not None:
            kk, vv = (y.transpose(0, 1).repeat_interleave(g, dim=0) for y in (k, v))
            return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=causal).transpose(0, 1)
        parts = []
        for a, b in itertools.pairwise(bounds):
            qq = q[a:b].transpose(0, 1)
            kk, vv = (y[a:b].transpose(0, 1).repeat_interleave(g, dim=0) for y in (k, v))
            parts.append(
                F.scaled_dot_product_attention(qq[None], kk[None], vv[None], is_causal=True)[0].transpose(
                    0, 1
                )
            )
        return self.torch.cat(parts)

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


# ---------------------------------------------------------------------------------------------- replay
def replay(  # noqa: C901 - the wall-clock twin of batching.simulate, kept side by side
    engine: Engine,
    jobs: Sequence[Job],
    limits: BatchLimits,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[Outcome], list[dict[str, Any]]]:
    """Serve ``jobs`` on the wall clock; every step is recorded (kind, start, size, tokens, ms)."""
    order = sorted(jobs, key=lambda j: j.arrival_s)
    sched = BatchScheduler(limits)
    row_of: dict[str, int] = {}
    ids: list[str] = []  # request id per row
    toks: list[int] = []
    positions: list[int] = []
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    refused: set[str] = set()
    steps: list[dict[str, Any]] = []

    def release(finished: list[Job], at: float) -> None:
        for job in finished:
            done[job.request_id] = at
            row, last = row_of.pop(job.request_id), len(ids) - 1
            if row != last:
                engine.move_row(last, row, positions[last])
                ids[row], toks[row], positions[row] = ids[last], toks[last], positions[last]
                row_of[ids[row]] = row
            ids.pop(), toks.pop(), positions.pop()

    gc.collect()
    gc.disable()
    t0 = clock()
    i = 0
    try:
        while i < len(order) or sched.in_system:
            now = clock() - t0
            while i < len(order) and order[i].arrival_s <= now:
                if not sched.offer(order[i]):
                    refused.add(order[i].request_id)
                i += 1
            if not sched.in_system:
                time.sleep(max(0.0, order[i].arrival_s - (clock() - t0)))
                continue
            new = sched.plan()
            if new:
                began = clock()
                lengths = [j.prompt_tokens for j in new]
                firsts = engine.prefill(len(ids), lengths)
                for job, tok in zip(new, firsts, strict=True):
                    row_of[job.request_id] = len(ids)
                    ids.append(job.request_id)
                    toks.append(tok)
                    positions.append(job.prompt_tokens)
                at = clock() - t0
                steps.append(
                    {
                        "kind": "prefill",
                        "start_s": began - t0,
                        "size": len(new),
                        "tokens": sum(lengths),
                        "ms": (at + t0 - began) * 1000,
                    }
                )
                for job in new:
                    first[job.request_id] = at
                release(sched.prefilled(new), at)
            if sched.batch_size:
                began = clock()
                out = engine.decode_step(toks, positions)
                toks[:] = out
                positions[:] = [p + 1 for p in positions]
                at = clock() - t0
                steps.append(
                    {
                        "kind": "decode",
                        "start_s": began - t0,
                        "size": len(out),
                        "ctx": max(positions),
                        "ms": (at + t0 - began) * 1000,
                    }
                )
                release(sched.decoded(), at)
    finally:
        gc.enable()
    outcomes = [
        Outcome(j.request_id, j.arrival_s, None, None)
        if j.request_id in refused
        else Outcome(j.request_id, j.arrival_s, first.get(j.request_id), done.get(j.request_id))
        for j in jobs
    ]
    return outcomes, steps


# ------------------------------------------------------------------------------------------- measuring
def _median_ms(run: Callable[[], Any], *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()  # every engine call ends with a device-to-host copy: synchronous
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def measure(engine: Engine, *, context: int = 400, repeats: int = 30) -> dict[str, Any]:
    """This engine's decode step per batch bucket (context ``context``) and packed prefill cost."""

    def step(b: int, position: int) -> Callable[[], Any]:
        return lambda: engine.decode_step([0] * b, [position] * b)

    def pack(lengths: list[int]) -> Callable[[], Any]:
        return lambda: engine.prefill(0, lengths)

    decode = {b: _median_ms(step(b, context), warmup=5, repeats=repeats) for b in BUCKETS}
    prefill = {}
    for total in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        prefill[total] = _median_ms(pack([min(total, 512)] * max(1, total // 512)), warmup=2, repeats=7)
    fixed, per_token = fit_line(list(prefill), list(prefill.values()))
    by_context = {
        f"{b}x{c}": _median_ms(step(b, c), warmup=3, repeats=repeats)
        for b in (1, 16, 64, 128)
        for c in range(CONTEXT_STEP - 1, engine.max_len, 2 * CONTEXT_STEP)
    }
    return {
        "decode_ms_by_batch_x_context": by_context,
        "decode_context": context,
        "decode_ms": decode,
        "prefill_ms": prefill,
        "prefill_fit": {"fixed_ms": fixed, "ms_per_token": per_token},
    }


if __name__ == "__main__":
    from bench.gpu_replay_cli import main

    raise SystemExit(main())
