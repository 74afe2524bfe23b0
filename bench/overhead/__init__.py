"""The pipeline's own overhead per stage, generation excluded, on the real local stack (issues 2 and 3).

    python -m bench.overhead                       # preset small: 10k examples, under 5 min on 2 cores
    python -m bench.overhead --preset full         # 100k examples (HNSW build included)
    python -m bench.overhead --set kafka.producer_max_batch_size=16384 --set embedding.batch_window_s=0.01

What runs: a Tansu broker, the embedded Milvus server, two dev TGI servers on the *emulated* engine
with every service time at 0 (they answer at once: what is left is HTTP and chat rendering), and one
``echolm worker`` subprocess (real MiniLM, real agents, ``worker.role=all``). The bench process is
the client (``EchoClient``) and shares the machine's cores with all of them.

Phases, in order (each bounded):

1. bank: N examples for one tenant written with ``MilvusExampleStore.upsert``. ``--real`` of them carry
   real MiniLM embeddings of generated support questions; the others are those vectors plus Gaussian
   noise (cosine 0.6-0.95 to their source), re-normalised, so searches see clustered, real-shaped
   neighbourhoods instead of random vectors. Then flush and wait for the HNSW index (or report that
   it did not finish);
2. micro (no worker running): ``select_examples`` on 20 hits found by exact cosine in that bank, and
   ``context_features`` + ``LinUCBBandit.expected`` + ``choose_backend``, many iterations each;
   MiniLM at batch 1 against batched (per sentence);
3. direct baseline: ``TGIGenerator.generate`` straight to the emulated backend at the steady rate
   (client -> backend, no echolm), with the message shape the pipeline sends (system + 5 examples + question);
4. pipeline: warm-up, then a steady open-loop rate for a fixed time (per-stage p50/p99 from the
   replies' ``timings_ms``, client end-to-end latency, ``echolm_stage_seconds`` deltas as a cross-check
   and for ``emit``, which replies do not carry), then a saturation burst (max replies/s).

Embed batch sizes are inferred from the replies: requests of one ``prepare`` batch carry the same
parse/embed/retrieve timings. Results: ``bench/results/overhead-<preset>.json`` and Markdown tables on stdout.

Modules, one concern each: ``config`` (presets, stage names), ``workload`` (generated questions and
bank rows), ``bank`` (write the bank, wait for the index), ``components`` (each part alone: the pure
decisions, MiniLM batching, the direct backend, the broker's fetch-wait floor), ``drive`` (open-loop
sends and reply collection), ``stages`` (per-stage statistics from replies and the worker's
histograms), ``cpu`` (CPU accounting by role), ``runner`` (the phases in order), ``output``
(Markdown, ``--compare``), ``plot`` (``--plot``), ``cli`` (flags, ``main``).
"""

from __future__ import annotations

from bench.overhead.cli import main, parse_args
from bench.overhead.config import PRESETS, Preset

__all__ = ["PRESETS", "Preset", "main", "parse_args"]
