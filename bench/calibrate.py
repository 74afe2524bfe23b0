"""Calibration for the fleet benchmark: how long an emulated backend takes, and how good a reply is.

    echolm bench calibrate                    # dev server + emulator check, then calibration.json (~1 min)
    echolm bench calibrate --skip-dev-server  # rebuild calibration.json from the GPU JSON only

Two tables, both written to ``bench/results/calibration.json``:

**Service time** (``TierService``: the three numbers of ``devstack.tgi_emulator.ServiceTimeModel``).

* GPU tiers come from ``bench/results/gpu-calibration-h100.json``, written by ``bench/gpu_calibrate.py``
  on the ``device`` tool's H100 (measured: prefill slope over 128-4096 tokens, decode step at batch 1,
  batch slowdown fitted over batch 1-32). Without that file, the decode figures of
  /work/shared/notes/gpu-calibration.md are used and prefill is *estimated* from FLOPs.
* The CPU tier is the dev server running SmolLM2-135M through llama.cpp, measured here from wall-clock
  differences (``measure_server``): prefill = (long prompt - short prompt) / extra tokens, decode =
  (N tokens - 1 token) / (N - 1). Every emulator configuration is then measured the same way, so the
  table shows what the emulator actually does next to what it was told to do.

**Quality** (``QualityModel``): emulated backends return filler, so a reply's quality is looked up by
the condition it was served under (``Condition``), as a win rate against the large model (0.5 =
parity, as in the paper's judge protocol). Where the numbers come from is carried in ``source`` and
printed with every result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.hostfacts import host_facts, loadavg, metadata

__all__ = [
    "CONDITIONS",
    "NOTES_DECODE_MS",
    "RESULTS_DIR",
    "Condition",
    "QualityModel",
    "TierService",
    "fit_slowdown",
    "load_calibration",
    "load_gpu_services",
    "load_quality_model",
    "measure_server",
    "quality_model_from_selection",
    "run_calibration",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_JSON = RESULTS_DIR / "gpu-calibration-h100.json"
CALIBRATION_JSON = RESULTS_DIR / "calibration.json"


# --------------------------------------------------------------------------------------- service time
@dataclass(frozen=True, slots=True)
class TierService:
    """One model's service time on one accelerator, in the emulator's terms."""

    name: str
    prefill_ms_per_token: float
    decode_ms_per_token: float
    batch_slowdown: float
    source: str

    def emulator_args(self, time_scale: float = 1.0) -> list[str]:
        """``python -m devstack.tgi_dev --engine emulated`` arguments (times multiplied by ``time_scale``)."""
        return [
            "--prefill-ms-per-token",
            f"{self.prefill_ms_per_token * time_scale:.6f}",
            "--decode-ms-per-token",
            f"{self.decode_ms_per_token * time_scale:.6f}",
            "--batch-slowdown",
            f"{self.batch_slowdown:.6f}",
        ]

    def request_s(self, prompt_tokens: int, new_tokens: int, batch: int = 1) -> float:
        """Emulated seconds for one request at a steady batch size (prefill + decode)."""
        factor = 1.0 + self.batch_slowdown * max(batch - 1, 0)
        return (
            factor * (prompt_tokens * self.prefill_ms_per_token + new_tokens * self.decode_ms_per_token) / 1e3
        )

    def capacity_rps(self, prompt_tokens: int, new_tokens: int, batch: int) -> float:
        """Requests per second one replica completes with ``batch`` sequences always running."""
        return batch / self.request_s(prompt_tokens, new_tokens, batch)


def fit_slowdown(batches: Sequence[int], step_ms: Sequence[float]) -> float:
    """S in ``step(B) = step(1) (1 + S (B - 1))``, least squares through the batch-1 point."""
    base = step_ms[list(batches).index(1)]
    pairs = [(b - 1, s / base - 1) for b, s in zip(batches, step_ms, strict=True) if b > 1]
    if not pairs:
        return 0.0
    return max(0.0, sum(x * y for x, y in pairs) / sum(x * x for x, _ in pairs))


# Decode ms/step at batch 1, 8, 32 from /work/shared/notes/gpu-calibration.md (H100, torch.compile,
# prompt 256); only used when bench/results/gpu-calibration-h100.json is missing.
NOTES_DECODE_MS = {"1B": (2.22, 2.51, 3.81), "8B": (8.18, 8.92, 12.74), "23B": (20.70, 23.07, 29.64)}
_NOTES_PARAMS = {"1B": 1.10e9, "8B": 7.24e9, "23B": 22.76e9}
_ESTIMATED_PREFILL_TFLOPS = 400.0  # about half of the H100's measured 798 dense bf16 TFLOP/s


def load_gpu_services(path: Path = GPU_JSON) -> dict[str, TierService]:
    """GPU tiers from ``bench/gpu_calibrate.py``'s JSON; else the notes' decode plus estimated prefill."""
    if path.is_file():
        data = json.loads(path.read_text())
        gpu = data.get("info", {}).get("gpu", "GPU")
        return {
            name: TierService(
                name=name,
                prefill_ms_per_token=float(m["derived"]["prefill_ms_per_token"]),
                decode_ms_per_token=float(m["derived"]["decode_ms_per_token"]),
                batch_slowdown=float(m["derived"]["batch_slowdown"]),
                source=f"measured: {gpu}, bench/gpu_calibrate.py ({path.name})",
            )
            for name, m in data.get("models", {}).items()
        }
    out = {}
    for name, (b1, b8, b32) in NOTES_DECODE_MS.items():
        prefill = 2 * _NOTES_PARAMS[name] / (_ESTIMATED_PREFILL_TFLOPS * 1e12) * 1e3
        out[name] = TierService(
            name=name,
            prefill_ms_per_token=prefill,
            decode_ms_per_token=b1,
            batch_slowdown=fit_slowdown([1, 8, 32], [b1, b8, b32]),
            source="decode: notes/gpu-calibration.md (H100); prefill: ESTIMATED from FLOPs at 400 TFLOP/s",
        )
    return out


# -------------------------------------------------------------------------------------------- quality
Condition = Literal[
    "large",  # the large tier answered
    "small_alone",  # the small tier answered with no examples
    "small_match",  # the small tier with examples, one of them a rewording of this very request
    "small_related",  # the small tier with examples, none of them from this request's group
    "cache_match",  # semantic cache returned the stored answer of a rewording of this request
    "cache_other",  # semantic cache returned the stored answer of a different question
    "failed",  # no reply, or an error reply: counts as a loss
]
CONDITIONS: tuple[Condition, ...] = (
    "large",
    "small_alone",
    "small_match",
    "small_related",
    "cache_match",
    "cache_other",
    "failed",
)


@dataclass(frozen=True, slots=True)
class QualityModel:
    """Expected win rate against the large model's own answer, per serving condition.

    ``large`` is 0.5 by definition (the judge compares the large model with itself). ``failed`` is 0.
    ``sources`` says, per condition, where its number comes from (measured offline, or assumed).
    """

    small_alone: float
    small_match: float
    small_related: float
    cache_match: float
    cache_other: float
    sources: Mapping[str, str] = field(default_factory=dict)
    large: float = 0.5
    failed: float = 0.0

    def __post_init__(self) -> None:
        for name in CONDITIONS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or not math.isfinite(value):
                raise ValueError(f"quality for {name!r} must be a win rate in [0, 1], got {value}")

    def quality(self, condition: Condition) -> float:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; conditions are {CONDITIONS}")
        return float(getattr(self, condition))

    def table(self) -> dict[str, dict[str, Any]]:
        return {
            c: {"win_rate": self.quality(c), "source": self.sources.get(c, "definition")} for c in CONDITIONS
        }

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> QualityModel:
        values = {c: float(v["win_rate"] if isinstance(v, Mapping) else v) for c, v in table.items()}
        sources = {c: str(v.get("source", "")) for c, v in table.items() if isinstance(v, Mapping)}
        return cls(
            small_alone=values["small_alone"],
            small_match=values["small_match"],
            small_related=values["small_related"],
            cache_match=values["cache_match"],
            cache_other=values["cache_other"],
            sources=sources,
        )


# What we assume where no offline measurement exists. Each number is a reading of the paper's figures
# for a model pair about 10x apart in size, not a measurement of ours; results say so.
ASSUMED_QUALITY = QualityModel(
    small_alone=0.30,
    small_match=0.48,
    small_related=0.27,
    cache_match=0.45,
    cache_other=0.05,
    sources={
        "small_alone": "ASSUMED: a ~10x smaller model alone, paper's range for 2B vs 27B",
        "small_match": "ASSUMED: small model shown a rewording's large answer: near parity (paper 0.48-0.56)",
        "small_related": "ASSUMED: unrelated examples slightly hurt (paper: irrelevant examples hurt)",
        "cache_match": "ASSUMED: a rewording's large answer returned as is, slightly off-target",
        "cache_other": "ASSUMED: another question's answer returned: almost always a loss",
    },
)


def _group(request_id: str) -> str:
    return request_id.rsplit("/", 1)[0]


def quality_model_from_selection(
    result: Mapping[str, Any],
    *,
    name: str = "selection-quality",
    selector: str = "two-stage",
    fallback: QualityModel | None = None,
    min_n: int = 3,
) -> tuple[QualityModel, dict[str, dict[str, float]]]:
    """The quality table measured by ``bench/selection_quality.py``, as win rates against the large model.

    Per evaluated request, each condition's reference score is compared with that of ``large-resample``
    (a second sample of the "large model" on the same request), with the run's tie margin: win 1, tie
    0.5, loss 0; a cell is the mean over its requests. Cells: ``small_alone`` = condition ``none``;
    ``small_match`` / ``small_related`` = ``selector``'s requests whose examples include / do not include a
    rewording of the request (same paraphrase group); ``cache_match`` / ``cache_other`` = ``semantic-cache``
    by whether its top-1 neighbour (the last example of ``similarity``) is a rewording. A cell with fewer
    than ``min_n`` requests keeps ``fallback``'s value, and its source says so. Returns the model and,
    per cell, n, win rate and Wilson 95% interval.
    """
    from agents.policy.scoring import outcomes
    from bench.stats import wilson_interval

    fallback = fallback or ASSUMED_QUALITY
    tie = float(result.get("preset", {}).get("tie", 0.02))
    cells: dict[str, list[float]] = {
        c: [] for c in ("small_alone", "small_match", "small_related", "cache_match", "cache_other")
    }
    for row in result.get("requests", []):
        scores, examples = row.get("scores", {}), row.get("examples", {})
        if "large-resample" not in scores:
            continue
        group = _group(row["request_id"])
        ref = float(scores["large-resample"])

        def outcome(condition: str, scores: Mapping[str, Any] = scores, ref: float = ref) -> float:
            return float(outcomes([float(scores[condition]) - ref], tie)[0])

        if "none" in scores:
            cells["small_alone"].append(outcome("none"))
        chosen = examples.get(selector) or []
        if selector in scores and chosen:
            same = any(_group(e) == group for e in chosen)
            cells["small_match" if same else "small_related"].append(outcome(selector))
        top = (examples.get("similarity") or [None])[-1]
        if "semantic-cache" in scores and top is not None:
            cells["cache_match" if _group(top) == group else "cache_other"].append(outcome("semantic-cache"))
    values, sources, stats = {}, {}, {}
    for cell, found in cells.items():
        n = len(found)
        if n >= min_n:
            rate = sum(found) / n
            low, high = wilson_interval(sum(found), n)
            values[cell] = rate
            sources[cell] = (
                f"measured offline ({name}, n={n}, 95% CI {low:.2f}-{high:.2f}; SmolLM2 vs its best-of-n)"
            )
            stats[cell] = {"n": n, "win_rate": rate, "ci_low": low, "ci_high": high}
        else:
            values[cell] = float(getattr(fallback, cell))
            sources[cell] = f"{fallback.sources.get(cell, 'fallback')} (only {n} offline samples)"
            stats[cell] = {"n": n, "win_rate": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    return QualityModel(**values, sources=sources), stats


def load_quality_model(results_dir: Path = RESULTS_DIR) -> QualityModel:
    """From the offline evaluation when it exists (``selection-quality-full.json``, else ``-small``), via
    ``quality_model_from_selection``; else ``ASSUMED_QUALITY``."""
    for name in ("selection-quality-full.json", "selection-quality-small.json"):
        path = results_dir / name
        if path.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                model, _ = quality_model_from_selection(json.loads(path.read_text()), name=path.name)
                return model
    return ASSUMED_QUALITY


# --------------------------------------------------------------------------------- measuring a server
_fresh = itertools.count()
_OPENING = "Once upon a time, in a small village by the sea, there lived"
_FILLER = "the quick brown fox jumps over the lazy dog "


def _prompt(words: int) -> str:
    return f"Chapter {next(_fresh)}. " + (_FILLER * (words // 9 + 1))[: words * 5] + " " + _OPENING


async def measure_server(
    url: str, *, long_words: int = 700, new_tokens: int = 64, repeats: int = 5, batch: int = 8
) -> dict[str, float]:
    """Prefill and decode ms/token of a TGI-protocol server, from wall-clock differences.

    Prompts carry a fresh number up front so a prefix cache cannot hide the prefill. Also, with
    ``batch`` concurrent requests, the slowdown per extra sequence implied by the mean wall time
    (meaningless for an engine that runs one sequence at a time: it then reflects queueing).
    """
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def call(prompt: str, tokens: int) -> tuple[float, int, int]:
            began = time.perf_counter()
            r = await client.post(
                "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": tokens}}
            )
            r.raise_for_status()
            return (
                time.perf_counter() - began,
                int(r.headers.get("x-prompt-tokens", 0)),
                int(r.headers.get("x-generated-tokens", tokens)),
            )

        await call(_prompt(20), 4)  # warm up
        prefill, decode = [], []
        for _ in range(repeats):
            short_s, short_tokens, _ = await call(_prompt(20), 1)
            long_s, long_tokens, _ = await call(_prompt(long_words), 1)
            prefill.append((long_s - short_s) * 1e3 / max(long_tokens - short_tokens, 1))
            many_s, _, generated = await call(_prompt(20), new_tokens)
            one_s, _, _ = await call(_prompt(20), 1)
            decode.append((many_s - one_s) * 1e3 / max(generated - 1, 1))
        decode_ms = statistics.median(decode)
        single = [(await call(_prompt(20), new_tokens))[0] for _ in range(3)]
        batched = await asyncio.gather(*(call(_prompt(20), new_tokens) for _ in range(batch)))
        factor = statistics.mean(s for s, _, _ in batched) / statistics.median(single)
    return {
        "prefill_ms_per_token": statistics.median(prefill),
        "decode_ms_per_token": decode_ms,
        "implied_batch_slowdown": max(0.0, (factor - 1) / (batch - 1)),
        "long_prompt_tokens": float(long_tokens),
        "repeats": float(repeats),
    }


async def _measure_dev_server(
    engine: Literal["llama", "emulated"], extra_args: Sequence[str], log_dir: Path, **kw: Any
) -> dict[str, float]:
    from devstack.tgi_dev import DevServerProcess

    server = DevServerProcess(
        port=0,
        engine=engine,
        ctx=8192 if engine == "emulated" else 2048,
        max_batch_size=kw.pop("max_batch_size", 1),
        extra_args=[*extra_args, "--log-level", "WARNING"],
        log_path=log_dir / f"calibrate-{engine}.log",
    )
    async with server:
        return await measure_server(server.url, **kw)


async def run_calibration(
    *, out: Path = CALIBRATION_JSON, dev_server: bool = True, log_dir: Path, progress: Any = print
) -> dict[str, Any]:
    """Measure the CPU dev server and check the emulator against every calibrated tier."""
    started, load_start = time.time(), loadavg()
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per run, nothing else is waiting
    gpu = load_gpu_services()
    tiers: dict[str, Any] = {name: asdict(s) for name, s in gpu.items()}
    checks: dict[str, Any] = {}
    if dev_server:
        progress("measuring the dev server (SmolLM2-135M, llama.cpp, 1 thread)")
        cpu = await _measure_dev_server(
            "llama", [], log_dir, long_words=700, new_tokens=48, repeats=3, batch=2
        )
        tiers["smollm2-cpu"] = asdict(
            TierService(
                "smollm2-cpu",
                cpu["prefill_ms_per_token"],
                cpu["decode_ms_per_token"],
                0.0,
                "measured: dev server, SmolLM2-135M Q4_1 via llama.cpp on this CPU, batch 1",
            )
        ) | {"measured": cpu}
    for name, tier in tiers.items():
        service = TierService(
            **{
                k: tier[k]
                for k in ("name", "prefill_ms_per_token", "decode_ms_per_token", "batch_slowdown", "source")
            }
        )
        progress(f"checking the emulator configured as {name}")
        long_words = 2500 if name != "smollm2-cpu" else 700
        checks[name] = await _measure_dev_server(
            "emulated",
            service.emulator_args(),
            log_dir,
            long_words=long_words,
            new_tokens=64,
            repeats=3,
            batch=8,
            max_batch_size=32,
        )
    quality = load_quality_model()
    command = "echolm bench calibrate" + ("" if dev_server else " --skip-dev-server")
    result = {
        **metadata("calibrate", command=command, started_at=started, wall_s=time.time() - started),
        "machine": host_facts(loadavg_start=load_start, loadavg_end=loadavg()),
        "tiers": tiers,
        "emulator_check": checks,
        "quality_model": quality.table(),
        "written_at": time.time(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))  # noqa: ASYNC240 - once per run, nothing else is waiting
    return result


def load_calibration(path: Path = CALIBRATION_JSON) -> tuple[dict[str, TierService], QualityModel]:
    """Service times and the quality model the fleet benchmark uses."""
    if path.is_file():
        data = json.loads(path.read_text())
        services = {
            name: TierService(
                **{
                    k: t[k]
                    for k in (
                        "name",
                        "prefill_ms_per_token",
                        "decode_ms_per_token",
                        "batch_slowdown",
                        "source",
                    )
                }
            )
            for name, t in data["tiers"].items()
        }
        return services, QualityModel.from_table(data["quality_model"])
    return load_gpu_services(), load_quality_model(path.parent)
