"""The harness of the hostile-input tests (test_hostile_*): servers on a loop of their own, a
raw HTTP/1.1 client, and what every answer must satisfy. Its fixtures are registered in
conftest (``pytest_plugins``).

Hostile and broken input: the proxy answers, never with a 5xx of its own or a leak.

Property tests (``hypothesis``) send generated requests as raw bytes over real sockets to a real
proxy in front of a real, recording upstream, on ``memory://`` and on a real ``redis-server``
(``store_url``). Hypothesis drives sync functions, so the servers run on an event loop in a thread
of their own (``LoopThread``) and the test thread talks to them with plain blocking sockets:
that also lets a test send bytes no HTTP client library would (control characters, invalid
UTF-8, half-quoted strings).

What every answer must satisfy (``assert_sane``): it comes within ``BOUND`` seconds, it is not a
5xx (the recording upstream never answers 5xx unless a test asks it to, so any 5xx is one the
proxy made itself), and it carries no Python traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from tests.conftest import HOST
from tests.raw_reply import Reply

BOUND = 5.0  # seconds: every request must be answered within this
SETUP_BOUND = 15.0  # seconds: starting and stopping servers
T = TypeVar("T")

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- servers on a loop of their own ------------------------------------------------------------


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` waits for a coroutine, bounded."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hostile-loop")
        self._thread.daemon = True
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = SETUP_BOUND) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(SETUP_BOUND)
        self.loop.close()


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


class Recorder:
    """The upstream: records every request and answers 201 with a body that carries a secret.

    ``marker`` is in the body, a Set-Cookie and the Location of every answer, so a test can
    check that no other client ever sees any of it. ``X-Test-Status`` picks another status,
    ``X-Test-Delay`` waits that many seconds first, ``X-Test-Drop`` closes the connection
    without an answer.
    """

    def __init__(self) -> None:
        self.calls: list[Seen] = []
        self.marker = f"upstream-secret-{uuid.uuid4().hex}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = list(request.headers.items())
        self.calls.append(Seen(request.method, request.raw_path, request.path, headers, body))
        serial = len(self.calls)
        if request.headers.get("X-Test-Drop"):
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        await asyncio.sleep(float(request.headers.get("X-Test-Delay", "0")))
        status = int(request.headers.get("X-Test-Status", "201"))
        secret = f"{self.marker}-{serial}"
        payload = json.dumps({"serial": serial, "secret": secret}).encode()
        response = web.Response(status=status, body=payload, content_type="application/json")
        response.headers.add("Set-Cookie", f"session={secret}; Path=/")
        response.headers["Location"] = f"/orders/{secret}"
        response.headers["X-Serial"] = str(serial)
        return response


class Harness:
    """A recording upstream and any number of proxies in front of it, on one loop thread."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.loop = LoopThread()
        self.recorder = Recorder()
        self._runners: list[web.AppRunner] = []
        self._proxies: list[ProxyServer] = []
        self.upstream_url = self.loop.run(self._start_upstream())

    async def _start_upstream(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.recorder.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, HOST, 0).start()
        return f"http://{HOST}:{runner.addresses[0][1]}"

    def proxy(self, policy: str, store: str | None = None) -> Proxy:
        config = load_text(
            policy,
            flags=Overrides(
                listen=f"{HOST}:0",
                admin=f"{HOST}:0",
                upstream=self.upstream_url,
                store=store or self.store,
            ),
            environ={},
        )
        prefix = f"test:hostile:{uuid.uuid4().hex[:12]}:"
        config = replace(config, store=replace(config.store, key_prefix=prefix))

        async def start() -> ProxyServer:
            server = ProxyServer(config)
            self._proxies.append(server)
            await server.start()
            return server

        server = self.loop.run(start())
        return Proxy(server.address[1], server.admin_address[1])

    def close(self) -> None:
        try:
            for server in self._proxies:
                self.loop.run(server.stop())
            for runner in self._runners:
                self.loop.run(runner.cleanup())
        finally:
            self.loop.close()


@dataclass(frozen=True)
class Proxy:
    port: int
    admin_port: int


@pytest.fixture
def harness(store_url: str) -> Iterator[Harness]:
    running = Harness(store_url)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def memory_harness() -> Iterator[Harness]:
    """For what does not depend on the store."""
    running = Harness("memory://")
    try:
        yield running
    finally:
        running.close()


# --- a raw HTTP/1.1 client ---------------------------------------------------------------------


def _dechunk(data: bytes) -> bytes | None:
    """The body of a complete chunked message, or None while it is incomplete."""
    body = b""
    while True:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return None
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return body if b"\r\n" in rest else None
        if len(rest) < size + 2:
            return None
        body += rest[:size]
        data = rest[size + 2 :]


def parse_reply(data: bytes, eof: bool, head_request: bool = False) -> Reply | None:
    """The first response in ``data``, or None while it is incomplete."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status = int(head.split(b"\r\n", 1)[0].split(b" ", 2)[1])
    reply = Reply(status, head, b"")
    length = reply.header("Content-Length")
    if head_request or status in (204, 304) or status < 200:
        return reply
    if "chunked" in (reply.header("Transfer-Encoding") or "").lower():
        body = _dechunk(rest)
        if body is None:
            return None
        reply.body = body
    elif length is not None:
        if len(rest) < int(length):
            return None
        reply.body = rest[: int(length)]
    elif eof:
        reply.body = rest
    else:
        return None
    return reply


def exchange(
    port: int, request: bytes, bound: float = BOUND, head_request: bool = False
) -> Reply | None:
    """Send ``request`` on a fresh connection; its answer, or None if the peer closed without one.

    Fails the test if neither happens within ``bound`` seconds.
    """
    deadline = time.monotonic() + bound
    data = b""
    with socket.create_connection((HOST, port), timeout=bound) as sock:
        # The proxy may refuse before reading everything; its answer is still there to read.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        while True:
            reply = parse_reply(data, eof=False, head_request=head_request)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no answer within {bound} s to {request[:200]!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                pytest.fail(f"no answer within {bound} s to {request[:200]!r}")
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return parse_reply(data, eof=True, head_request=head_request) if data else None
            data += chunk


def build(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + HOST.encode(), b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def assert_sane(reply: Reply | None, request: bytes) -> Reply:
    """The answer exists, is not a 5xx the proxy made, and shows no traceback."""
    assert reply is not None, f"the proxy closed the connection without answering {request[:300]!r}"
    assert reply.status < 500, (reply.status, reply.body[:500], request[:300])
    assert b"Traceback" not in reply.body, reply.body[:1000]
    assert b'File "' not in reply.body, reply.body[:1000]
    return reply


# --- inputs more than one test file sends --------------------------------------------------

KEY_REQUIRED = """
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
"""
# Bytes RFC 9110 forbids in a field value (CTL other than HTAB): the HTTP parser may refuse them
# with its own 400 before the proxy's code sees the header.
FORBIDDEN_IN_FIELDS = frozenset([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])

VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
# Non-ASCII that is not Unicode whitespace: see test_unicode_whitespace_around_a_key_is_invalid.
NON_ASCII = st.characters(min_codepoint=0x80, exclude_categories=["Cs", "Zs", "Zl", "Zp", "Cc"])
