"""Fleet-scale benchmark without a fleet: echolm and its baselines on one stream, in one run.

    echolm bench fleet --preset small          # about 12 minutes on 2 cores
    echolm bench fleet --preset full           # longer streams; see docs/benchmarks.md

What is real and what is emulated:

* **Real**: the Tansu Kafka broker, the embedded Milvus server, MiniLM embeddings, the echolm worker
  (prepare/serve/admit/learn agents, selector, LinUCB router with the live queue-depth load term,
  TGI adapter and queue probe), ``EchoClient``, the baselines' dispatch and semantic cache, and
  every latency and throughput figure, measured end to end on this machine.
* **Emulated**: the GPU backends. Each replica is a dev TGI server on the emulated engine
  (``infra/tgi_emulator.py``: continuous batching, ``tgi_queue_size``/``tgi_batch_current_size``
  gauges, the real wire protocol) whose prefill/decode/batch-slowdown numbers come from H100
  measurements of 1B and 8B Llama-shaped decoders (``bench/gpu_calibrate.py``, calibration.json),
  times ``time_scale``. Replies are filler text.
* **Modelled**: quality. Each reply's win rate against the large model is looked up from the serving
  condition (``bench.calibrate.QualityModel``): large tier, small tier alone, small tier with a
  rewording of the request among its examples, with unrelated examples only, a semantic-cache hit on
  a rewording or on another question. The conditions are measured per request (from echolm's log
  topic, or the cache's hit); the table is the model.

Equal hardware: every system gets ``slots`` emulated GPUs. Large-only: all large; small-only: all
small; semantic cache: all large (misses); echolm and the load-blind router: ``echolm_small`` small
and the rest large. Each system serves the same two phases of one seeded workload
(``bench/workloads.py``): **burst** (bursty arrivals, latency and quality) and **saturation** (the
continuation of the stream, all sent within ``saturation_window_s``: completions per second is the
system's capacity). Systems run one after another on the same broker, Milvus and backends, each with

Modules, one concern each: ``preset`` (presets, systems, tier names), ``quality`` (the quality table
and the condition of a reply), ``workbench`` (the workload turned into bank rows and schedules),
``replicas`` (broker, Milvus and the emulated replicas; queue-depth sampling), ``echolm_path``
(seeding the bank, reading echolm's log, serving through ``EchoClient``), ``training`` (the offline
utility model), ``systems`` (both phases of one system), ``runner`` (every system, the result JSON).
Issue 12's rework of the quality model and the emulator lands in ``quality`` and new modules beside
``replicas``.
"""

from __future__ import annotations

from bench.fleet.preset import PRESETS, SYSTEMS, FleetPreset
from bench.fleet.quality import PRIMARY_QUALITY, condition_of, offline_quality_model
from bench.fleet.runner import run_fleet
from bench.fleet.workbench import bank_answer, token_lengths

__all__ = [
    "PRESETS",
    "PRIMARY_QUALITY",
    "SYSTEMS",
    "FleetPreset",
    "bank_answer",
    "condition_of",
    "offline_quality_model",
    "run_fleet",
    "token_lengths",
]
