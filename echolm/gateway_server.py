"""Run the gateway: bind the port, connect the Kafka relay, serve with uvicorn until stopped.

The port is bound before anything else and the relay connected before the first request is
accepted, so a busy port or an unreachable broker is a one-line error (``echolm.cli_errors``), not a
server that starts and then answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys

from infra.settings import Settings

from .cli_errors import CliFailure

__all__ = ["bind", "curl_example", "run", "run_gateway"]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CliFailure(
                "port",
                f"port {port} on {host} is in use (another gateway?)",
                "stop it, or set ECHOLM_GATEWAY__PORT / --port",
            ) from exc
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def curl_example(url: str, key: str = "$ECHOLM_KEY") -> str:
    """A curl line that asks the gateway at ``url`` (``http://host:port/v1``) one question."""
    return (
        f"curl {url}/chat/completions -H 'Authorization: Bearer {key}' "
        """-H 'Content-Type: application/json' -d '{"model": "echolm-auto", """
        """"messages": [{"role": "user", "content": "Hello"}]}'"""
    )


async def run_gateway(settings: Settings) -> int:
    import uvicorn

    from .client import EchoClient
    from .gateway import build_gateway

    gw = settings.gateway
    sock = bind(gw.host, gw.port)
    client = EchoClient(settings)
    try:
        await client.start()
        try:
            app = build_gateway(settings, client)
        except ValueError as exc:
            raise CliFailure("usage", str(exc)) from exc
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}/v1"
        print(f"[echolm gateway] OpenAI-compatible API at {url}", file=sys.stderr, flush=True)
        print(f"  {curl_example(url)}", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
        server = uvicorn.Server(config)
        await server.serve(sockets=[sock])
        return 0
    finally:
        await client.aclose()
        with contextlib.suppress(OSError):
            sock.close()


def run(settings: Settings) -> int:
    return asyncio.run(run_gateway(settings))
