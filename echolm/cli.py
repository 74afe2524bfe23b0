"""The ``echolm`` command. Every subcommand has ``--help``; settings come from ``ECHOLM_*`` env vars
and an optional TOML file (``ECHOLM_CONFIG`` or ./echolm.toml), see README's configuration table.

    echolm up [--demo]             local stack (broker, Milvus, 2 dev TGI backends) + workers + gateway
    echolm worker                  one worker process (what docker-compose runs)
    echolm ask "question"          one request, print the reply
    echolm send FILE.jsonl         many requests, replies as JSONL, with a progress bar
    echolm feedback ID SCORE       rate a reply (0..1)
    echolm topics create|list      create the six topics with the configured partitions
    echolm bank import|export      warm-start the example bank from JSONL, or dump it
    echolm rebuild-cache           rebuild the example bank from the log topic
    echolm config                  print the effective settings (secrets masked)
    echolm gateway [new-key]       OpenAI-compatible HTTP API (or print a new API key and its hash)
    echolm bench ...               benchmarks (see BENCHMARKS.md)

Exit codes: 0 ok, 1 a request failed, 2 usage or configuration, 3 broker unreachable, 4 Milvus
unreachable, 5 backend unreachable, 6 port in use, 7 bad input file, 8 missing topic, 9 timeout,
10 local stack failed, 130 interrupted. Expected failures print one or two lines; -v adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from infra.settings import Settings, load_settings

from .cli_errors import CliFailure, describe

if TYPE_CHECKING:
    from .client import EchoClient

__all__ = ["main", "read_jsonl_requests", "run_command"]

log = logging.getLogger("echolm")

_CLIENT_COMMANDS = frozenset({"ask", "send", "feedback", "topics", "gateway", "bank", "rebuild-cache"})


# ----------------------------------------------------------------------------------- subcommands
def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from .worker import run_worker

    return run_worker(settings, role=args.role)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from .up import run_up

    return run_up(
        settings,
        demo=args.demo,
        exit_after_demo=args.exit_after_demo,
        workers=args.workers,
        milvus=args.milvus,
        gateway=not args.no_gateway,
    )


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[EchoClient]:
    """A started EchoClient, closed even when starting it failed (no "Unclosed AIOKafkaProducer")."""
    from .client import EchoClient

    client = EchoClient(settings)
    try:
        await client.start()
        yield client
    finally:
        await client.aclose()


async def _ask(settings: Settings, args: argparse.Namespace) -> int:
    async with _connected(settings) as client:
        reply = await client.ask(
            args.prompt, tenant=args.tenant, timeout=args.timeout, max_new_tokens=args.max_new_tokens
        )
    if args.json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    elif reply.ok:
        print(reply.text)
        print(
            f"\n[{reply.backend} ({reply.tier}), {reply.n_examples} example(s), "
            f"{reply.latency_s * 1000:.0f} ms, id {reply.request_id}]",
            file=sys.stderr,
        )
    else:
        print(f"error {reply.error_code}: {reply.error_message}", file=sys.stderr)
    return 0 if reply.ok else 1


def cmd_ask(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_ask(settings, args))


def read_jsonl_requests(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The good rows of a JSONL request file, and one message per bad line (by line number)."""
    if not path.is_file():
        raise CliFailure(
            "input", f"{path} is not a readable file", 'pass a JSONL file of {"prompt": ...} rows'
        )
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            bad.append(f"line {number}: not valid JSON ({str(exc).split(':')[0]})")
            continue
        if not isinstance(row, dict):
            bad.append(f"line {number}: not a JSON object")
        elif not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            bad.append(f"line {number}: no non-empty string 'prompt'")
        elif not all(isinstance(row.get(k, ""), str) for k in ("tenant", "request_id")):
            bad.append(f"line {number}: 'tenant' and 'request_id' must be strings")
        elif not isinstance(row.get("max_new_tokens", 0), int) or isinstance(row.get("max_new_tokens"), bool):
            bad.append(f"line {number}: 'max_new_tokens' must be an integer")
        else:
            rows.append(row)
    return rows, bad


async def _send(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    rows, bad = read_jsonl_requests(Path(args.file))
    for message in bad:
        print(f"{args.file}: {message}; skipped", file=sys.stderr)
    out = sys.stdout.buffer if args.out == "-" else Path(args.out).open("wb")  # noqa: SIM115 - closed below
    failed = 0
    try:
        async with _connected(settings) as client:
            sent: set[str] = set()
            for row in tqdm(rows, desc="send", unit="req", disable=args.quiet, file=sys.stderr):
                sent.add(
                    await client.send(
                        row["prompt"],
                        tenant=row.get("tenant", args.tenant),
                        request_id=row.get("request_id"),
                        max_new_tokens=row.get("max_new_tokens"),
                    )
                )
            bar = tqdm(total=len(sent), desc="replies", unit="req", disable=args.quiet, file=sys.stderr)
            got = 0
            async for reply in client.replies(timeout=args.timeout):
                out.write(orjson.dumps(reply) + b"\n")
                got += 1
                failed += 0 if reply.ok else 1
                bar.update(1)
                if got >= len(sent):
                    break
            bar.close()
            missing = len(sent) - got
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    print(f"{got} replies ({failed} errors), {missing} missing after {args.timeout}s idle", file=sys.stderr)
    if bad:
        raise CliFailure(
            "input",
            f"{len(bad)} bad line(s) in {args.file} were skipped (listed above)",
            "fix them and resend those",
        )
    return 0 if missing == 0 and failed == 0 else 1


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_send(settings, args))


async def _feedback(settings: Settings, args: argparse.Namespace) -> int:
    async with _connected(settings) as client:
        await client.feedback(args.request_id, args.score, tenant=args.tenant)
    return 0


def cmd_feedback(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_feedback(settings, args))


def cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    from infra.topics import create_topics
    from streams.topology import topic_configs, topic_specs

    specs = topic_specs(settings)
    if args.action == "create":
        asyncio.run(
            create_topics(
                settings.kafka.bootstrap_servers,
                specs,
                configs=topic_configs(settings),
            )
        )
    for name, partitions in specs.items():
        print(f"{name}\t{partitions}")
    return 0


def cmd_bank(settings: Settings, args: argparse.Namespace) -> int:
    from .bank import export_bank, import_bank

    if args.action == "import":
        return asyncio.run(import_bank(settings, Path(args.file), tenant=args.tenant, quiet=args.quiet))
    return asyncio.run(export_bank(settings, args.out, tenant=args.tenant, quiet=args.quiet))


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from .bank import rebuild_cache

    return asyncio.run(rebuild_cache(settings, collection=args.collection, quiet=args.quiet))


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    from infra.settings import masked

    print(orjson.dumps(masked(settings), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_gateway(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "new-key":
        from infra.auth import hash_key, new_api_key

        key = new_api_key()
        print(f"key:  {key}\n(give the key to the client; store only the line below)", file=sys.stderr)
        print(f"{args.tenant} {hash_key(key, scheme=args.scheme)}")
        return 0
    from .gateway_server import run

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if updates:
        settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update=updates)})
    return run(settings)


def _bench_main(argv: Sequence[str]) -> NoReturn:
    """``echolm bench ARGS`` becomes ``python -m bench.cli ARGS`` in this same process (exec): the
    runtime never imports bench (bench sits above it), and signals, exit codes and the terminal are
    the benchmark's own, as when it ran in-process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "bench.cli", *argv])  # noqa: S606 - our interpreter


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    _bench_main(args.bench_args)


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echolm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the local stack and workers (no Docker needed)")
    p.add_argument(
        "--demo", action="store_true", help="after start-up, ask sample questions and print replies"
    )
    p.add_argument("--exit-after-demo", action="store_true", help="stop everything after the demo")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: stack.workers)")
    p.add_argument(
        "--milvus", choices=["server", "lite"], default=None, help="embedded server or Milvus Lite"
    )
    p.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI-compatible gateway")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run one worker process against the configured cluster")
    p.add_argument("--role", choices=["all", "serve", "background"], default=None, help="which agents to run")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("ask", help="send one request and print its reply")
    p.add_argument("prompt")
    p.add_argument("--tenant", default="default")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the reply")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("send", help="produce requests from a JSONL file and collect the replies")
    p.add_argument("file", help='JSONL rows: {"prompt": "...", "tenant": "...", "request_id": "..."}')
    p.add_argument("--tenant", default="default", help="tenant for rows that name none")
    p.add_argument("--out", default="-", help="where to write replies as JSONL (default stdout)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this many idle seconds")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("feedback", help="rate a reply (0 = bad .. 1 = good)")
    p.add_argument("request_id")
    p.add_argument("score", type=float)
    p.add_argument("--tenant", default="default")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("topics", help="create or list the topics")
    p.add_argument("action", choices=["create", "list"])
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("bank", help="import or export the example bank (JSONL per tenant)")
    p.add_argument("action", choices=["import", "export"])
    p.add_argument(
        "file", nargs="?", default="-", help="import: JSONL of {request, response}; export: ignored"
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("--out", default="-", help="export: output path (default stdout)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("rebuild-cache", help="rebuild the example bank from the log topic")
    p.add_argument("--collection", default=None, help="target collection (default: the configured one)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("gateway", help="OpenAI-compatible HTTP API (new-key: print an API key and its hash)")
    p.add_argument("action", nargs="?", choices=["serve", "new-key"], default="serve")
    p.add_argument("--host", default=None, help="listen address (default: gateway.host)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: gateway.port)")
    p.add_argument("--tenant", default="default", help="new-key: the tenant the key acts for")
    p.add_argument("--scheme", choices=["sha256", "scrypt"], default="sha256", help="new-key: hash scheme")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("bench", help="run benchmarks (echolm bench --help)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        # argparse's REMAINDER drops a leading option (`echolm bench --help`): hand over before parsing.
        return _bench_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "aiokafka", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose and args.command in _CLIENT_COMMANDS:
        # aiokafka logs every failed connection attempt at ERROR; the failure is reported once below.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    overrides: dict[str, Any] = {}
    if getattr(args, "role", None):
        overrides["worker"] = {"role": args.role}
    try:
        settings = load_settings()
        if overrides:
            settings = settings.model_copy(
                update={"worker": settings.worker.model_copy(update=overrides["worker"])}
            )
    except Exception as exc:  # noqa: BLE001 - turn any settings error into one readable line
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return run_command(args, settings)


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the chosen command; an expected failure becomes one or two lines and its exit code."""
    try:
        return int(args.func(settings, args))
    except (Exception, KeyboardInterrupt) as exc:
        failure = describe(exc, settings)
        if failure is None:
            raise  # not an expected failure: a bug, keep the traceback
        if args.verbose:
            traceback.print_exception(exc)
        print(failure.lines(), file=sys.stderr)
        return failure.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
