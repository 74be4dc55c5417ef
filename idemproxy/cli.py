"""Command line: ``idemproxy run | check | keys | schema | version``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from idemproxy import __version__
from idemproxy.config import Config, ConfigError, Overrides, load

CONFIG_ENV = "IDEMPROXY_CONFIG"

KEYS_EPILOG = """\
The admin token is read from $IDEMPROXY_ADMIN_TOKEN (a flag would show in ps).
exit codes: 0 done, 1 no such key, 2 anything else (no token, 401, unreachable, bad --admin)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idemproxy", description="An idempotency-key reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"idemproxy {__version__}")
    # check takes run's flags too, so it can say whether that exact `run` would start.
    proxy = argparse.ArgumentParser(add_help=False)
    proxy.add_argument("-c", "--config", help=f"policy file (default: ${CONFIG_ENV})")
    proxy.add_argument("--listen", metavar="HOST:PORT", help="proxy address (127.0.0.1:8080)")
    proxy.add_argument("--upstream", metavar="URL", help="upstream base URL")
    proxy.add_argument("--store", metavar="URL", help="memory://, redis://, rediss://, unix://")
    proxy.add_argument("--workers", type=int, default=1, metavar="N", help="processes (1)")
    proxy.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="admin address (127.0.0.1:9901); http://HOST:PORT is accepted too",
    )
    proxy.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log lines (json)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", parents=[proxy], help="run the proxy")
    commands.add_parser(
        "check",
        parents=[proxy],
        help="validate a policy file (with run's flags: exactly what run would start)",
    )
    commands.add_parser("version", help="print the version")
    commands.add_parser("schema", help="print the JSON Schema of the policy file")
    keys = commands.add_parser(
        "keys",
        help="inspect or purge one key through the admin API",
        epilog=KEYS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys.add_argument("action", choices=("get", "delete"))
    keys.add_argument("key", help="the idempotency key as the client sent it")
    keys.add_argument(
        "--scope",
        action="append",
        help="raw credential value (e.g. the Authorization header); repeat for several",
    )
    keys.add_argument(
        "--admin",
        default="http://127.0.0.1:9901",
        metavar="URL|HOST:PORT",
        help="the admin listener (http://127.0.0.1:9901)",
    )
    keys.add_argument("--body", action="store_true", help="include stored headers and body")
    return parser


def _admin_listen(value: str | None) -> str | None:
    """``--admin`` as HOST:PORT; ``http://HOST:PORT`` (what ``keys --admin`` takes) too."""
    if value is None or "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.scheme != "http" or parts.path not in ("", "/") or parts.query or not parts.netloc:
        return value  # the config names --admin and says HOST:PORT
    return parts.netloc


def _load(path: str | None, flags: Overrides) -> Config | None:
    try:
        return load(path, flags)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem.render(exc.source), file=sys.stderr)
        return None


NO_UPSTREAM = "no upstream: pass --upstream URL or set upstream.url"


def _refusal(config: Config, workers: int) -> str | None:
    """Why ``run`` refuses a valid config with an upstream and ``--workers``; ``check`` applies
    the same rules."""
    if workers < 1:
        return "--workers must be at least 1"
    if workers > 1 and config.store.url == "memory://":
        return (
            "--workers > 1 needs a shared store: each worker process would have "
            "its own memory store, so a retry landing on another worker would run again. "
            "Use --store redis://HOST:6379/0, or run one worker."
        )
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
        from idemproxy.admin_cli import keys_command

        return keys_command(args.action, args.key, args.scope, args.admin, args.body)
    path = args.config or os.environ.get(CONFIG_ENV) or None
    flags = Overrides(
        listen=args.listen,
        upstream=args.upstream,
        store=args.store,
        admin=_admin_listen(args.admin),
    )
    if args.command == "check":
        return _check(path, flags, args.workers)
    config = _load(path, flags)
    if config is None:
        return 1
    refusal = _refusal(config, args.workers) if config.upstream.url else NO_UPSTREAM
    if refusal is not None:
        print(f"idemproxy run: {refusal}", file=sys.stderr)
        return 1
    # Imported here: check, keys and version start without the proxy, its stores and uvloop.
    from idemproxy.app import last_resort, run_loop, serve
    from idemproxy.observability import setup_logging

    setup_logging(args.log_format)
    if args.workers > 1:
        from idemproxy.supervisor import run_workers

        return last_resort(lambda: run_workers(config, path, flags, args.workers, args.log_format))
    return last_resort(lambda: run_loop(serve(config, path, flags)))


def _check(path: str | None, flags: Overrides, workers: int) -> int:
    """Exit 1 for anything ``run`` with the same flags would refuse.

    One exception: a file without an upstream passes with a warning, because a policy may
    leave the upstream to ``run --upstream`` (flags override the file); give ``--upstream``
    to ``check`` as well to check that exact combination.
    """
    if path is None:
        print("idemproxy check: name the policy file with -c FILE", file=sys.stderr)
        return 1
    config = _load(path, flags)
    if config is None:
        return 1
    if not config.upstream.url:
        print(
            f"warning: {path}: upstream.url: not set, so `idemproxy run` starts only with "
            "--upstream URL",
            file=sys.stderr,
        )
    refusal = _refusal(config, workers)
    if refusal is not None:
        print(f"idemproxy check: `idemproxy run` would refuse this: {refusal}", file=sys.stderr)
        return 1
    print(_summary(config))
    return 0
