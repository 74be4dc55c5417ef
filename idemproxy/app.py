"""Wiring: build the store, upstream and handler from a config; start, reload and stop them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from aiohttp import web

from idemproxy.admin import AdminContext, create_admin_app, probe_store
from idemproxy.config import Config, ConfigError, Overrides, load
from idemproxy.observability import WORKER_PUBLISH_INTERVAL, Metrics, event, flush_access_log
from idemproxy.policy import Policy
from idemproxy.proxy import KeyedProxy
from idemproxy.redact import redact
from idemproxy.server import HeadTimeoutServer
from idemproxy.store import open_store
from idemproxy.store.timed import TimedStore
from idemproxy.tracing import start_tracing

T = TypeVar("T")

# Parts of a config that a reload cannot change in a running process.
_NEEDS_RESTART = (
    "listen",
    "admin_listen",
    "admin_token",
    "upstream",
    "store",
    "shutdown_timeout",
    "limits",  # the server's timeouts and bounds are set when it starts
    "tracing",
)
HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's "alive" messages to its supervisor
_LAST_EXPORT = 2.0  # shutdown: the longest the last spans may take to export (collector down)


def _bound(runner: web.BaseRunner) -> tuple[str, int]:
    host, port = runner.addresses[0][:2]
    return str(host), int(port)


class ProxyServer:
    """The proxy listener and the admin listener of one process."""

    def __init__(self, config: Config, worker: bool = False) -> None:
        """``worker``: one of several processes sharing the listen port (SO_REUSEPORT); the
        supervisor, not the worker, serves the admin listener."""
        self.config = config
        self.worker = worker
        self.metrics = Metrics()
        self.tracer = start_tracing(config.tracing)  # the no-op one unless tracing is configured
        self.store = TimedStore(
            open_store(
                config.store,
                config.limits.memory_store_max_keys,
                config.limits.memory_store_max_bytes,
            ),
            self.metrics.store_timer,
        )
        self.upstream = self.tracer.upstream(config.upstream)
        self.handler = KeyedProxy(
            Policy(config.routes),
            self.tracer.store(self.store),
            self.upstream,
            config.store.key_prefix,
            fail_open=config.store.on_error == "fail_open",
            metrics=self.metrics,
            limits=config.limits,
            tracer=self.tracer,
        )
        # auto_decompress=False: request bodies go upstream exactly as the client encoded them.
        limits = config.limits
        server = HeadTimeoutServer(
            self.handler.handle,
            header_timeout=limits.header_timeout,
            on_refused=self.handler.refused,
            access_log=None,
            auto_decompress=False,
            max_line_size=limits.max_request_line,
            max_field_size=limits.max_header_size,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.idle_timeout,
        )
        self._proxy = web.ServerRunner(server, shutdown_timeout=config.shutdown_timeout)
        self.stopping = False
        admin = AdminContext(
            self.store,
            self.metrics.exposition,
            config.store.key_prefix,
            config.admin_token,
            stopping=lambda: self.stopping,
        )
        self._admin = web.AppRunner(create_admin_app(admin), access_log=None)
        self._publishing: asyncio.TimerHandle | None = None

    def _publish_metrics(self) -> None:
        """A worker's counts reach the supervisor's /metrics every WORKER_PUBLISH_INTERVAL."""
        self.metrics.publish()
        loop = asyncio.get_running_loop()
        self._publishing = loop.call_later(WORKER_PUBLISH_INTERVAL, self._publish_metrics)

    async def start(self) -> None:
        await self.upstream.start()
        await self._proxy.setup()
        host, port = self.config.listen
        await web.TCPSite(self._proxy, host, port, reuse_port=self.worker or None).start()
        if self.worker:
            self._publish_metrics()
        if not self.worker:
            await self._admin.setup()
            admin_host, admin_port = self.config.admin_listen
            await web.TCPSite(self._admin, admin_host, admin_port).start()
        # Workers leave the probe to the supervisor: one warning, not one per process.
        store_ready = None if self.worker else await probe_store(self.store, self.config.store)
        event(
            "idemproxy started" if not self.worker else "idemproxy worker started",
            listen="{}:{}".format(*self.address),
            admin="{}:{}".format(*self.admin_address) if not self.worker else None,
            upstream=self.config.upstream.url,
            store=redact(self.config.store.url),
            store_ready=store_ready,
            routes=len(self.config.routes),
            keys_api=bool(self.config.admin_token),
        )

    @property
    def address(self) -> tuple[str, int]:
        return _bound(self._proxy)

    @property
    def admin_address(self) -> tuple[str, int]:
        return _bound(self._admin)

    def reload(self, new: Config) -> list[str]:
        """Serve ``new``'s routes from now on; requests in flight finish under their old route.

        Returns the names of changed settings that only a restart applies.
        """
        self.handler.policy = Policy(new.routes)
        ignored = [
            name for name in _NEEDS_RESTART if getattr(new, name) != getattr(self.config, name)
        ]
        self.config = reloaded(self.config, new)
        return ignored

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within ``shutdown_timeout``, then close.

        A request cancelled at the deadline settles its lease on the way out (see
        ``KeyedProxy._forward_holding_lease``), so no lease is left behind by a clean stop.
        """
        self.stopping = True
        stop_began = time.monotonic()
        # aiohttp's own shutdown waits shutdown_timeout for a handler, then fails only its
        # request body and waits as long again before it cancels: the deadline is kept here.
        deadline = asyncio.get_running_loop().call_later(
            self.config.shutdown_timeout, self.handler.cancel_in_flight
        )
        try:
            await self._proxy.cleanup()
        finally:
            deadline.cancel()
        await self.handler.drain()
        if self._publishing is not None:
            self._publishing.cancel()
        self.metrics.publish()  # a worker's last counts, before it exits
        if not self.worker:
            await self._admin.cleanup()
        await self.upstream.close()
        await self.store.close()
        left = self.config.shutdown_timeout - (time.monotonic() - stop_began)
        await self.tracer.shutdown(min(_LAST_EXPORT, max(left, 0.0)))


def reloaded(running: Config, new: Config) -> Config:
    """What a process runs after a reload to ``new``: its policy, with the settings that only a
    restart applies kept from ``running``."""
    return dataclasses.replace(new, **{name: getattr(running, name) for name in _NEEDS_RESTART})


def _reload(server: ProxyServer, path: str | None, flags: Overrides) -> None:
    if path is None:
        event("reload skipped: idemproxy runs without a policy file", logging.WARNING)
        return
    try:
        new = load(path, flags)
    except ConfigError as exc:
        event(
            "reload refused: the policy file is invalid; the old policy keeps serving",
            logging.ERROR,
            file=path,
            problems=[p.render(exc.source) for p in exc.problems],
        )
        return
    ignored = server.reload(new)
    event("policy reloaded", file=path, routes=len(new.routes), needs_restart=ignored)


async def serve(
    config: Config,
    path: str | None = None,
    flags: Overrides | None = None,
    supervisor: Connection | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads ``path``.

    ``supervisor``: this process is a worker of ``idemproxy run --workers N``; it says "serving"
    on this connection once it listens, and stops gracefully when the connection ends (the
    supervisor is gone, even by SIGKILL), so no worker outlives it holding the port.
    Returns the exit code: 0, or 1 when the proxy cannot listen.
    """
    server = ProxyServer(config, worker=supervisor is not None)
    # Before start: its listeners (and /healthz) are up while it still probes the store (up to
    # READY_TIMEOUT), and a signal then must not kill the process with the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, server, path, flags or Overrides())
    try:
        await server.start()
    except BaseException as exc:
        await server.stop()  # what did start is closed, also on the way to last_resort
        if not isinstance(exc, OSError):
            raise
        event(
            "idemproxy cannot listen",
            logging.ERROR,
            listen="{}:{}".format(*config.listen),
            admin="{}:{}".format(*config.admin_listen) if supervisor is None else None,
            error=str(exc),
        )
        return 1
    heartbeat: asyncio.Task[None] | None = None
    if supervisor is not None:
        supervisor.send_bytes(b"serving")
        heartbeat = asyncio.create_task(_heartbeat(supervisor), name="heartbeat")
        # The supervisor never writes, so the connection turns readable only at its end.
        loop.add_reader(supervisor.fileno(), _supervisor_gone, stop)
    await stop.wait()
    if supervisor is not None and heartbeat is not None:
        heartbeat.cancel()
        loop.remove_reader(supervisor.fileno())
    event("idemproxy shutting down", drain_seconds=config.shutdown_timeout)
    await server.stop()
    flush_access_log()
    event("idemproxy stopped")
    return 0


async def _heartbeat(supervisor: Connection) -> None:
    """Say "alive" every ``HEARTBEAT_INTERVAL`` from the event loop: a supervisor that stops
    hearing it knows the loop is stuck, although the process lives."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        try:
            supervisor.send_bytes(b"alive")
        except OSError:  # the supervisor is gone; _supervisor_gone stops this worker
            return


def _supervisor_gone(stop: asyncio.Event) -> None:
    if not stop.is_set():
        event("the supervisor is gone; this worker stops", logging.WARNING)
        stop.set()


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (not on Windows), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


def last_resort(run: Callable[[], int]) -> int:
    """Run ``run``; an exception nothing expected becomes one log line and exit code 1.

    With ``--log-format json`` that line is JSON too (the traceback in its ``error`` field), so a
    log pipeline never sees a bare multi-line traceback.
    """
    try:
        return run()
    except Exception as exc:
        # The JSON line's ``error`` becomes the whole traceback; a text line keeps this summary.
        fields = {"error": f"{type(exc).__name__}: {exc}"}
        logging.getLogger("idemproxy").critical(
            "idemproxy crashed", exc_info=True, extra={"fields": fields}
        )
        return 1
