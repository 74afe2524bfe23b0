"""TGI's Prometheus metrics, written by hand so names match TGI's exporter exactly.

TGI exports through metrics-rs, whose counters carry no ``_total`` suffix (``tgi_request_count``);
prometheus_client would rename them, so this module renders the text format itself. Gauges are read
from the live ``RequestQueue`` at scrape time, never cached.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from devstack.tgi_dev.scheduler import RequestQueue

__all__ = ["DevMetrics"]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKENS = tuple(float(2**i) for i in range(13))  # 1 .. 4096


@dataclass
class _Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total:.6f}"]
        lines.append(f"{self.name}_count {self.n}")
        return lines


class DevMetrics:
    def __init__(self, queue: RequestQueue) -> None:
        self._queue = queue
        self._requests = 0
        self._successes = 0
        self._failures: Counter[str] = Counter()
        self._histograms = {
            h.name: h
            for h in (
                _Histogram("tgi_request_duration", "End-to-end request time in seconds", _SECONDS),
                _Histogram("tgi_request_queue_duration", "Time spent waiting in the queue", _SECONDS),
                _Histogram("tgi_request_inference_duration", "Time spent generating", _SECONDS),
                _Histogram("tgi_request_mean_time_per_token_duration", "Inference time per token", _SECONDS),
                _Histogram("tgi_request_input_length", "Prompt tokens per request", _TOKENS),
                _Histogram("tgi_request_generated_tokens", "Generated tokens per request", _TOKENS),
            )
        }

    def request_received(self) -> None:
        self._requests += 1

    def request_failed(self, error_type: str) -> None:
        self._failures[error_type] += 1

    def request_succeeded(
        self,
        *,
        duration_s: float,
        queue_s: float,
        inference_s: float,
        input_tokens: int,
        generated_tokens: int,
    ) -> None:
        self._successes += 1
        observe = {
            "tgi_request_duration": duration_s,
            "tgi_request_queue_duration": queue_s,
            "tgi_request_inference_duration": inference_s,
            "tgi_request_mean_time_per_token_duration": inference_s / max(generated_tokens, 1),
            "tgi_request_input_length": float(input_tokens),
            "tgi_request_generated_tokens": float(generated_tokens),
        }
        for name, value in observe.items():
            self._histograms[name].observe(value)

    def render(self) -> str:
        q = self._queue
        lines = [
            "# HELP tgi_queue_size Requests waiting in the queue",
            "# TYPE tgi_queue_size gauge",
            f"tgi_queue_size {q.waiting}",
            "# HELP tgi_batch_current_size Requests in the running batch",
            "# TYPE tgi_batch_current_size gauge",
            f"tgi_batch_current_size {q.running}",
            "# HELP tgi_batch_current_max_tokens Tokens reserved by the running batch",
            "# TYPE tgi_batch_current_max_tokens gauge",
            f"tgi_batch_current_max_tokens {q.running_max_tokens}",
            "# TYPE tgi_request_count counter",
            f"tgi_request_count {self._requests}",
            "# TYPE tgi_request_success counter",
            f"tgi_request_success {self._successes}",
            "# TYPE tgi_request_failure counter",
        ]
        lines += [f'tgi_request_failure{{err="{err}"}} {n}' for err, n in sorted(self._failures.items())]
        for histogram in self._histograms.values():
            lines += histogram.render()
        return "\n".join(lines) + "\n"
