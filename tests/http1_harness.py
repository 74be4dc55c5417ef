"""The harness of the lean HTTP/1.1 client's tests (test_http1_framing, test_http1_failures).

The upstream is a raw asyncio server on 127.0.0.1 that records the exact bytes of every
request and answers with exact bytes chosen by the test; the client side is a raw socket too,
so what the proxy answers is compared byte for byte. Nothing is mocked; timings are only ever
bounded generously from above.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from tests.conftest import HOST
from tests.raw_reply import Reply

BOUND = 10.0  # seconds: every answer must come within this (generous; never a tight timing)
DATE = b"Date: Tue, 01 Apr 2025 10:00:00 GMT"  # upstream answers carry a fixed Date
MARKER = b"Idempotent-Replayed: true\r\n"
BIG = 5 * 1024 * 1024


def policy(defaults: str = "", upstream: str = "") -> str:
    """A keyed route (key required) on POST /orders and everything below it."""
    text = "routes:\n  - match: {methods: [POST], path: /orders/**}\n    key: {required: true}\n"
    if defaults:
        text += f"defaults: {{{defaults}}}\n"
    if upstream:
        text += f"upstream: {{{upstream}}}\n"
    return text


# --- the upstream: a raw HTTP/1.1 server that answers with exact bytes ------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    number: int  # 1-based, over the server's lifetime
    connection: int  # 1-based number of the connection it came on
    head: bytes  # request line and header lines, up to (without) the blank line
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:]

    def values(self, name: bytes) -> list[bytes]:
        found = []
        for line in self.header_lines:
            key, _, value = line.partition(b":")
            if key.lower() == name.lower():
                found.append(value.strip(b" \t"))
        return found

    @property
    def key(self) -> bytes:
        keys = self.values(b"idempotency-key")
        return keys[0] if keys else b""


class Conn:
    """The server's side of one connection, handed to the answering function."""

    def __init__(
        self, server: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer

    async def send(self, *pieces: bytes, pause: float = 0.0) -> None:
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def hold(self) -> None:
        """Keep the connection open, answering nothing, until the peer closes it (bounded)."""
        try:
            async with asyncio.timeout(BOUND * 2):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return
        except OSError:
            pass
        self.server.closed_by_peer += 1


# answer(conn, seen) -> keep the connection open for another request?
Answerer = Callable[[Conn, Seen], Awaitable[bool]]


class RawUpstream:
    def __init__(self, answer: Answerer, idle_close: float | None = None) -> None:
        self.answer = answer
        self.idle_close = idle_close  # close a kept-alive connection idle for this long
        self.seen: list[Seen] = []
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.closed_by_peer = 0  # connections the proxy closed (EOF or reset while we read/wrote)
        self.server: asyncio.Server | None = None
        self.serving: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.sockets[0].getsockname()[1]}"

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.serving):
            task.cancel()
        await asyncio.gather(*self.serving, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    def count(self, key: bytes) -> int:
        return sum(1 for seen in self.seen if seen.key == key)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        self.accepted += 1
        number = self.accepted
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        conn = Conn(self, reader, writer)
        try:
            first = True
            while True:
                wait = self.idle_close if (self.idle_close and not first) else BOUND * 3
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
                except asyncio.IncompleteReadError as exc:
                    if not first or exc.partial:
                        self.closed_by_peer += 1
                    return
                except TimeoutError:
                    return  # idle: close it (the upstream's own keep-alive timeout)
                first = False
                seen = Seen(len(self.seen) + 1, number, head[:-4], b"")
                lengths = seen.values(b"content-length")
                if len(lengths) == 1 and lengths[0].isdigit():
                    seen.body = await reader.readexactly(int(lengths[0]))
                self.seen.append(seen)
                if not await self.answer(conn, seen):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_peer += 1
        except asyncio.CancelledError:
            return  # stopped by close(): end quietly (asyncio logs a cancelled handler task)
        finally:
            self.open -= 1
            self.serving.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def response(
    status: bytes = b"201 Created",
    body: bytes = b'{"ok": true}',
    headers: tuple[bytes, ...] = (),
    close: bool = False,
) -> bytes:
    lines = [b"HTTP/1.1 " + status, DATE, *headers, b"Content-Length: %d" % len(body)]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def keyed_body(seen: Seen) -> bytes:
    """An answer body naming the request it answers (a mixed-up answer would show)."""
    return b'{"key": "%s", "n": %d}' % (seen.key, seen.number)


async def answer_ok(conn: Conn, seen: Seen) -> bool:
    await conn.send(response(body=keyed_body(seen)))
    return True


# --- the proxy in front of it, and a raw client -----------------------------------------------


@dataclass
class Env:
    upstream: RawUpstream
    proxy: ProxyServer

    @property
    def port(self) -> int:
        return self.proxy.address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@contextlib.asynccontextmanager
async def running(
    answer: Answerer,
    text: str = "",
    idle_close: float | None = None,
    upstream_port: int | None = None,
    start_upstream: bool = True,
) -> AsyncIterator[Env]:
    upstream = RawUpstream(answer, idle_close)
    if start_upstream:
        await upstream.start(upstream_port or 0)
        url = upstream.url
    else:
        url = f"http://{HOST}:{upstream_port}"
    config = load_text(
        text or policy(),
        flags=Overrides(listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=url, store="memory://"),
        environ={},
    )
    prefix = f"test:http1:{uuid.uuid4().hex[:12]}:"
    proxy = ProxyServer(replace(config, store=replace(config.store, key_prefix=prefix)))
    await proxy.start()
    try:
        yield Env(upstream, proxy)
    finally:
        await proxy.stop()
        await upstream.close()


def build(
    key: str | None,
    body: bytes | None = b'{"item": "tea"}',
    target: bytes = b"/orders",
    headers: tuple[bytes, ...] = (),
) -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: shop.test"]
    if key is not None:
        lines.append(b"Idempotency-Key: " + key.encode())
    lines.extend(headers)
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


async def send_raw(port: int, request: bytes) -> Reply:
    """Write ``request`` (which asks for Connection: close) and read the answer to its end."""
    async with asyncio.timeout(BOUND):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(request)
            await writer.drain()
            raw = await reader.read(-1)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    rest = raw
    while True:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"no complete answer: {raw[:300]!r}"
        status = int(head.split(b" ", 2)[1])
        if not 100 <= status < 200:
            return Reply(status, head, rest, raw)


async def post(
    env: Env, key: str | None, target: bytes = b"/orders", headers: tuple[bytes, ...] = ()
) -> Reply:
    return await send_raw(env.port, build(key, target=target, headers=headers))


def without_marker(raw: bytes) -> bytes:
    return raw.replace(MARKER, b"", 1)


def assert_replay_of(replay: Reply, first: Reply) -> None:
    """Byte for byte the first answer (status line, headers in order, body) plus the mark."""
    assert replay.replayed, replay.head
    assert not first.replayed
    assert without_marker(replay.raw) == first.raw


async def assert_retry_settled(env: Env, key: str, first: Reply, ambiguous: str) -> None:
    """A retry of a failed exchange: the stored error answer and no second execution (store),
    or a fresh run (release)."""
    retry = await post(env, key)
    if ambiguous == "store":
        assert_replay_of(retry, first)
        assert env.upstream.count(key.encode()) == 1
    else:
        assert retry.status == 201, retry.raw[:300]
        assert not retry.replayed
        assert env.upstream.count(key.encode()) == 2


def assert_problem(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.raw[:500])
    doc = reply.problem()
    assert doc["code"] == code, doc
    assert doc["status"] == status


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds, for at most BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


def uid() -> str:
    return uuid.uuid4().hex


# --- well-formed framings, shared by both test files ------------------------------------------


@dataclass(frozen=True)
class Framing:
    name: str
    pieces: tuple[bytes, ...]  # what the upstream writes, piece by piece
    status: int
    body: bytes  # the body the client must get
    headers: tuple[bytes, ...]  # header lines the client must get, in this order
    close: bool = False  # the upstream closes after writing (read-until-close framing)


COOKIES = (b"Set-Cookie: a=1; Path=/", b"X-Dup: one", b"set-cookie: b=2", b"X-Dup: two")
COOKIE_HEAD = b"\r\n".join(COOKIES)

FRAMINGS = [
    Framing(
        "content-length",
        (response(b"201 Created", b"hello world", COOKIES),),
        201,
        b"hello world",
        COOKIES,
    ),
    Framing(
        "chunked-extensions-trailers",
        (
            b"HTTP/1.1 200 OK\r\n" + DATE + b"\r\n" + COOKIE_HEAD + b"\r\n"
            b"Transfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n",
            b"5;name=value\r\nhello\r\n",
            b"1\r\n \r\nA ; ext\r\n0123456789\r\n",
            b"0\r\nX-Sum: 42\r\n\r\n",
        ),
        200,
        b"hello 0123456789",
        COOKIES,
    ),
    Framing(
        "read-until-close",
        (b"HTTP/1.0 200 OK\r\n" + DATE + b"\r\n" + COOKIE_HEAD + b"\r\n\r\n", b"until ", b"eof"),
        200,
        b"until eof",
        COOKIES,
        close=True,
    ),
    Framing(
        "no-body-204",
        (b"HTTP/1.1 204 No Content\r\n" + DATE + b"\r\n" + COOKIE_HEAD + b"\r\n\r\n",),
        204,
        b"",
        COOKIES,
    ),
    Framing(
        "no-body-304",
        (
            b"HTTP/1.1 304 Not Modified\r\n" + DATE + b'\r\nETag: "v1"\r\n'
            b"Content-Length: 1234\r\n" + COOKIE_HEAD + b"\r\n\r\n",
        ),
        304,
        b"",
        (b'ETag: "v1"', *COOKIES),
    ),
    Framing(
        "interim-100-and-103",
        (
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
            response(b"201 Created", b"final", COOKIES),
        ),
        201,
        b"final",
        COOKIES,
    ),
]
