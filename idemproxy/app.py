"""Wiring: build the store, upstream and handler from a config; start, run and stop them."""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from idemproxy.admin import create_admin_app
from idemproxy.config import Config
from idemproxy.policy import Policy
from idemproxy.proxy import KeyedProxy
from idemproxy.store import open_store
from idemproxy.upstream import Upstream

log = logging.getLogger("idemproxy")


def redact(url: str) -> str:
    """A URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _bound(runner: web.BaseRunner) -> tuple[str, int]:
    host, port = runner.addresses[0][:2]
    return str(host), int(port)


class ProxyServer:
    """The proxy listener and the admin listener of one process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = open_store(config.store)
        self.upstream = Upstream(config.upstream)
        self.handler = KeyedProxy(
            Policy(config.routes),
            self.store,
            self.upstream,
            config.store.key_prefix,
            fail_open=config.store.on_error == "fail_open",
        )
        server = web.Server(self.handler.handle, access_log=None)
        self._proxy = web.ServerRunner(server, shutdown_timeout=config.shutdown_timeout)
        self._admin = web.AppRunner(create_admin_app(self.store), access_log=None)

    async def start(self, reuse_port: bool = False) -> None:
        await self.upstream.start()
        await self._proxy.setup()
        await self._admin.setup()
        host, port = self.config.listen
        await web.TCPSite(self._proxy, host, port, reuse_port=reuse_port or None).start()
        admin_host, admin_port = self.config.admin_listen
        await web.TCPSite(self._admin, admin_host, admin_port).start()
        log.info(
            "idemproxy listening on %s:%d, upstream %s, store %s, admin on %s:%d",
            *self.address,
            self.config.upstream.url,
            redact(self.config.store.url),
            *self.admin_address,
        )

    @property
    def address(self) -> tuple[str, int]:
        return _bound(self._proxy)

    @property
    def admin_address(self) -> tuple[str, int]:
        return _bound(self._admin)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within ``shutdown_timeout``, then close."""
        await self._proxy.cleanup()
        await self._admin.cleanup()
        await self.upstream.close()
        await self.store.close()


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = ProxyServer(config)
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        raise SystemExit(f"idemproxy: cannot listen: {exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("idemproxy shutting down, draining for up to %ss", config.shutdown_timeout)
    await server.stop()
    log.info("idemproxy stopped")
