"""Command line: ``idemproxy run | check | version``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from idemproxy import __version__
from idemproxy.config import Config, ConfigError, Overrides, load
from idemproxy.observability import setup_logging

CONFIG_ENV = "IDEMPROXY_CONFIG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idemproxy", description="An idempotency-key reverse proxy."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help=f"policy file (default: ${CONFIG_ENV})")
    run.add_argument("--listen", metavar="HOST:PORT", help="proxy address (127.0.0.1:8080)")
    run.add_argument("--upstream", metavar="URL", help="upstream base URL")
    run.add_argument("--store", metavar="URL", help="memory://, redis://, rediss://, unix://")
    run.add_argument("--workers", type=int, default=1, metavar="N", help="processes (1)")
    run.add_argument("--admin", metavar="HOST:PORT", help="admin address (127.0.0.1:9901)")
    run.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log lines (json)"
    )
    check = commands.add_parser("check", help="validate a policy file")
    check.add_argument("-c", "--config", help=f"policy file (default: ${CONFIG_ENV})")
    commands.add_parser("version", help="print the version")
    commands.add_parser("schema", help="print the JSON Schema of the policy file")
    keys = commands.add_parser("keys", help="inspect or purge one key through the admin API")
    keys.add_argument("action", choices=("get", "delete"))
    keys.add_argument("key", help="the idempotency key as the client sent it")
    keys.add_argument(
        "--scope",
        action="append",
        help="raw credential value (e.g. the Authorization header); repeat for several",
    )
    keys.add_argument("--admin", default="http://127.0.0.1:9901", help="admin base URL")
    keys.add_argument("--body", action="store_true", help="include stored headers and body")
    return parser


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _load(path: str | None, flags: Overrides) -> Config | None:
    try:
        return load(path, flags)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem.render(exc.source), file=sys.stderr)
        return None


def _summary(config: Config) -> str:
    keyed = sum(1 for route in config.routes if route.keyed)
    return (
        f"ok: {config.source or 'built-in defaults'}: {len(config.routes)} route(s), "
        f"{keyed} keyed, store {config.store.url.split('://')[0]}://"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"idemproxy {__version__}")
        return 0
    if args.command == "schema":
        from idemproxy.schema import schema_text

        print(schema_text(), end="")
        return 0
    if args.command == "keys":
        from idemproxy.keys_client import keys_command

        return keys_command(args.action, args.key, args.scope, args.admin, args.body)
    path = args.config or os.environ.get(CONFIG_ENV) or None
    if args.command == "check":
        if path is None:
            print("idemproxy check: name the policy file with -c FILE", file=sys.stderr)
            return 1
        config = _load(path, Overrides())
        if config is None:
            return 1
        print(_summary(config))
        return 0

    flags = Overrides(
        listen=args.listen, upstream=args.upstream, store=args.store, admin=args.admin
    )
    config = _load(path, flags)
    if config is None:
        return 1
    if not config.upstream.url:
        print(
            "idemproxy run: no upstream: pass --upstream URL or set upstream.url", file=sys.stderr
        )
        return 1
    if args.workers < 1:
        print("idemproxy run: --workers must be at least 1", file=sys.stderr)
        return 1
    if args.workers > 1 and config.store.url == "memory://":
        print(
            "idemproxy run: --workers > 1 needs a shared store: each worker process would have "
            "its own memory store, so a retry landing on another worker would run again. "
            "Use --store redis://HOST:6379/0, or run one worker.",
            file=sys.stderr,
        )
        return 1
    setup_logging(args.log_format)
    if args.workers > 1:
        from idemproxy.supervisor import run_workers

        return run_workers(config, path, flags, args.workers, args.log_format)
    from idemproxy.app import serve

    run_loop(serve(config, path, flags))
    return 0
