"""The lean HTTP/1.1 client of keyed exchanges (``idemproxy.http1``), end to end and directly.

Keyed requests go to the upstream through ``Http1Pool``; pass-through stays on aiohttp. Here the
upstream is a raw asyncio server on 127.0.0.1 that records the exact bytes of every request and
answers with exact bytes chosen by the test (well-formed framings, keep-alive behaviours, slow
answers, malformed answers). The client side is a raw socket too, so what the proxy answers is
compared byte for byte. Nothing is mocked; timings are only ever bounded generously from above.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import aiohttp
import pytest
import uvloop
from conftest import HOST, free_port

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from idemproxy.errors import UpstreamFailure
from idemproxy.http1 import Http1Pool

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


@dataclass
class Reply:
    status: int
    head: bytes  # the final response's status line and headers (no blank line)
    body: bytes  # the bytes after the head, as sent (may be chunk-framed when streamed)
    raw: bytes  # everything the proxy sent, interim responses included

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:]

    def values(self, name: bytes) -> list[bytes]:
        return [
            line.partition(b":")[2].strip()
            for line in self.header_lines
            if line.partition(b":")[0].lower() == name.lower()
        ]

    @property
    def replayed(self) -> bool:
        return self.values(b"Idempotent-Replayed") == [b"true"]

    def problem(self) -> dict[str, object]:
        assert self.values(b"Content-Type") == [b"application/problem+json"], self.head
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return doc


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


# --- 1. response framings, replayed byte for byte ---------------------------------------------


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


@pytest.mark.parametrize("framing", FRAMINGS, ids=[f.name for f in FRAMINGS])
async def test_response_framing_is_forwarded_and_replayed_byte_identically(
    framing: Framing,
) -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        await conn.send(*framing.pieces, pause=0.01)
        return not framing.close

    async with running(answer) as env:
        key = uid()
        first = await post(env, key)
        assert first.status == framing.status, first.raw[:500]
        assert not first.replayed
        assert first.body == framing.body
        got = [line for line in first.header_lines if line in framing.headers]
        assert got == list(framing.headers), first.head  # order, duplicates and case kept
        assert first.values(b"Date") == [DATE.partition(b": ")[2]]
        assert not first.values(b"Transfer-Encoding")
        assert not first.values(b"Trailer")
        assert b"X-Sum" not in first.raw
        assert b"Early Hints" not in first.raw
        assert b"Link:" not in first.raw
        replay = await post(env, key)
        assert_replay_of(replay, first)
        assert_replay_of(await post(env, key), first)
        assert env.upstream.count(key.encode()) == 1
        # The connection was left in a state fit for the next exchange (or was replaced).
        other = await post(env, uid())
        assert other.status == framing.status
        assert len(env.upstream.seen) == 2
        assert env.upstream.accepted == (2 if framing.close else 1)


# --- 2. what the upstream receives ------------------------------------------------------------


async def test_upstream_gets_the_clients_header_bytes_minus_hop_by_hop() -> None:
    async with running(answer_ok) as env:
        request = (
            b"POST /orders/a%2Fb%20c?q=caf%C3%A9&x=1+2&x=%2F HTTP/1.1\r\n"
            b"Host: Shop.Example:8443\r\n"
            b"Idempotency-Key: capture-1\r\n"
            b"x-lower: a\r\n"
            b"X-Dup: 1\r\n"
            b"X-MiXeD-CaSe: v\r\n"
            b"Connection: keep-alive, X-Hop-Named\r\n"
            b"X-Dup: 2\r\n"
            b"X-Obs: caf\xe9 \xff!\r\n"
            b"X-Hop-Named: secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-T\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            b"Expect: 100-continue\r\n"
            b"Content-Length: 5\r\n"
            b"\r\n"
            b"hello"
        )
        reader, writer = await asyncio.open_connection(HOST, env.port)
        try:
            writer.write(request)
            raw = await asyncio.wait_for(reader.readuntil(b'"n": 1}'), BOUND)
        finally:
            writer.close()
        final = raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")  # aiohttp's, if it sent one
        assert final.startswith(b"HTTP/1.1 201"), raw[:300]
        assert len(env.upstream.seen) == 1
        seen = env.upstream.seen[0]
        assert seen.request_line == b"POST /orders/a%2Fb%20c?q=caf%C3%A9&x=1+2&x=%2F HTTP/1.1"
        assert seen.header_lines == [
            b"Host: Shop.Example:8443",
            b"Idempotency-Key: capture-1",
            b"x-lower: a",
            b"X-Dup: 1",
            b"X-MiXeD-CaSe: v",
            b"X-Dup: 2",
            b"X-Obs: caf\xe9 \xff!",
            b"X-Forwarded-For: 127.0.0.1",
            b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: Shop.Example:8443",
            b"Content-Length: 5",
        ]
        assert seen.body == b"hello"


@dataclass(frozen=True)
class Framed:
    name: str
    lines: tuple[bytes, ...]
    body: bytes  # as the client writes it
    forwarded: bytes  # the body the upstream must get


REQUEST_FRAMINGS = [
    Framed("content-length", (b"Content-Length: 5",), b"hello", b"hello"),
    Framed(
        "chunked",
        (b"Transfer-Encoding: chunked",),
        b"3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"hello",
    ),
    Framed("no-body", (), b"", b""),
    Framed("content-length-zero", (b"Content-Length: 0",), b"", b""),
]


@pytest.mark.parametrize("framed", REQUEST_FRAMINGS, ids=[f.name for f in REQUEST_FRAMINGS])
async def test_request_body_is_forwarded_with_exactly_one_content_length(framed: Framed) -> None:
    async with running(answer_ok) as env:
        head = [b"POST /orders HTTP/1.1", b"Host: shop.test", b"Idempotency-Key: k", *framed.lines]
        request = b"\r\n".join([*head, b"Connection: close"]) + b"\r\n\r\n" + framed.body
        reply = await send_raw(env.port, request)
        assert reply.status == 201, reply.raw[:300]
        [seen] = env.upstream.seen
        assert seen.values(b"Content-Length") == [str(len(framed.forwarded)).encode()]
        assert seen.values(b"Transfer-Encoding") == []
        assert seen.values(b"Trailer") == []
        assert b"X-Trailer" not in seen.head
        assert seen.body == framed.forwarded


async def test_http10_request_without_host_gets_the_upstreams_host() -> None:
    async with running(answer_ok) as env:
        request = b"POST /orders HTTP/1.0\r\nIdempotency-Key: h10\r\nContent-Length: 2\r\n\r\nhi"
        reply = await send_raw(env.port, request)
        assert reply.status == 201, reply.raw[:300]
        [seen] = env.upstream.seen
        assert seen.request_line == b"POST /orders HTTP/1.1"
        port = env.upstream.url.rsplit(":", 1)[1]
        assert seen.values(b"Host") == [f"{HOST}:{port}".encode()]
        assert seen.values(b"X-Forwarded-Host") == []
        assert seen.body == b"hi"


async def test_connection_naming_host_does_not_strip_the_host_header() -> None:
    async with running(answer_ok) as env:
        reply = await post(env, "conn-host", headers=(b"Connection: Host",))
        assert reply.status == 201, reply.raw[:300]
        [seen] = env.upstream.seen
        assert len(seen.values(b"Host")) == 1, seen.head


# --- 3. keep-alive ----------------------------------------------------------------------------


async def test_sequential_keyed_requests_reuse_one_connection() -> None:
    async with running(answer_ok) as env:
        keys = [uid() for _ in range(5)]
        for key in keys:
            reply = await post(env, key)
            assert reply.status == 201
            assert json.loads(reply.body)["key"] == key
        assert env.upstream.accepted == 1
        assert [seen.connection for seen in env.upstream.seen] == [1] * 5


async def test_connection_close_answer_gets_a_new_connection_next_time() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        await conn.send(response(body=keyed_body(seen), close=True))
        return False

    async with running(answer) as env:
        for _ in range(3):
            assert (await post(env, uid())).status == 201
        assert env.upstream.accepted == 3
        assert [seen.connection for seen in env.upstream.seen] == [1, 2, 3]


async def test_http10_keep_alive_answer_is_reused_and_plain_http10_is_not() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        body = keyed_body(seen)
        keep = seen.number <= 2
        extra = b"Connection: keep-alive\r\n" if keep else b""
        await conn.send(
            b"HTTP/1.0 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)
        )
        return True

    async with running(answer) as env:
        for _ in range(4):
            assert (await post(env, uid())).status == 200
        # 1 and 2 kept alive; 3 (HTTP/1.0 without keep-alive) closed by the proxy after use.
        assert [seen.connection for seen in env.upstream.seen] == [1, 1, 1, 2]


async def test_upstream_closing_an_idle_connection_does_not_fail_the_next_request() -> None:
    async with running(answer_ok, idle_close=0.1) as env:
        first = await post(env, "idle-1")
        assert first.status == 201
        await asyncio.sleep(0.6)  # the upstream closes the idle connection; the proxy sees it
        second = await post(env, "idle-2")
        assert second.status == 201, second.raw[:400]
        assert json.loads(second.body)["key"] == "idle-2"
        assert env.upstream.count(b"idle-1") == 1
        assert env.upstream.count(b"idle-2") == 1
        assert env.upstream.accepted == 2


async def test_extra_bytes_after_an_answer_make_the_connection_unusable() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        body = keyed_body(seen)
        await conn.send(response(body=body) + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return True

    async with running(answer) as env:
        first = await post(env, "extra-1")
        second = await post(env, "extra-2")
        assert json.loads(first.body)["key"] == "extra-1"
        assert json.loads(second.body)["key"] == "extra-2"  # not the unrequested answer
        assert env.upstream.accepted == 2


# --- 4. the pool bound ------------------------------------------------------------------------


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
async def test_pool_never_opens_more_than_max_connections(close: bool) -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        await asyncio.sleep(0.2)
        await conn.send(response(body=keyed_body(seen), close=close))
        return not close

    text = policy(upstream="max_connections: 2")
    async with running(answer, text) as env:
        keys = [uid() for _ in range(10)]
        replies = await asyncio.gather(*(post(env, key) for key in keys))
        assert [reply.status for reply in replies] == [201] * 10
        assert [json.loads(reply.body)["key"] for reply in replies] == keys
        assert env.upstream.max_open <= 2
        assert len(env.upstream.seen) == 10
        if not close:
            assert env.upstream.accepted <= 2


async def test_waiting_for_a_pooled_connection_past_connect_timeout_is_a_connect_failure() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.key == b"hog":
            await asyncio.sleep(2.5)
        await conn.send(response(body=keyed_body(seen)))
        return True

    text = policy(upstream="max_connections: 1, connect_timeout: 500ms")
    async with running(answer, text) as env:
        hog = asyncio.create_task(post(env, "hog"))
        await until(lambda: bool(env.upstream.seen))
        starved = await post(env, "starved")
        assert_problem(starved, 502, "upstream_unavailable")
        assert env.upstream.count(b"starved") == 0
        assert (await hog).status == 201
        # Nothing was sent (kind "connect"): the lease was released and a retry runs.
        retry = await post(env, "starved")
        assert retry.status == 201
        assert not retry.replayed
        assert env.upstream.count(b"starved") == 1


# --- 5. malformed answers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    name: str
    pieces: tuple[bytes, ...]
    close: bool = False  # close after writing; otherwise hold the connection open
    pause: float = 0.0


def _head_over_limit(size: int) -> bytes:
    filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"v" * 80) for i in range(size // 100 + 1))
    return b"HTTP/1.1 200 OK\r\n" + filler


MALFORMED = [
    Malformed("garbage-status-line", (b"SURPRISE! not http at all\r\n\r\n",)),
    Malformed("http2-status-line", (b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok",)),
    Malformed("non-numeric-status", (b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",)),
    Malformed(
        "header-without-colon", (b"HTTP/1.1 200 OK\r\nX-No-Colon\r\nContent-Length: 2\r\n\r\nok",)
    ),
    Malformed(
        "space-before-colon", (b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok",)
    ),
    Malformed(
        "obs-fold", (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",)
    ),
    Malformed(
        "bare-cr-in-value", (b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",)
    ),
    Malformed(
        "bare-lf-in-value", (b"HTTP/1.1 200 OK\r\nX-A: a\nb\r\nContent-Length: 2\r\n\r\nok",)
    ),
    Malformed(
        "conflicting-content-length",
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",),
    ),
    Malformed("signed-content-length", (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",)),
    # RFC 9112 6.3: replayed as it came, it would carry a Content-Length its body does not have
    Malformed(
        "content-length-and-chunked",
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
        ),
    ),
    Malformed(
        "chunked-and-content-length",
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
        ),
    ),
    Malformed(
        "bad-chunk-size",
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",),
    ),
    Malformed(
        "chunk-data-overrun",
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n0\r\n\r\n",),
    ),
    Malformed(
        "chunk-size-overflow",
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000002\r\nok\r\n",),
    ),
    Malformed("head-over-64k-never-ending", (_head_over_limit(100 * 1024),)),
    Malformed(
        "closed-mid-content-length-body",
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it",),
        close=True,
    ),
    Malformed(
        "closed-mid-chunked-body",
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly",),
        close=True,
    ),
    Malformed("closed-mid-head", (b"HTTP/1.1 200 OK\r\nContent-Le",), close=True),
    Malformed("closed-before-answering", (), close=True),
]

HEAD_CROSSING = Malformed(
    "head-over-64k-ending-in-the-crossing-read",
    (
        _head_over_limit(60 * 1024),
        b"X-Last: " + b"v" * 10 * 1024 + b"\r\nContent-Length: 2\r\n\r\nok",
    ),
    pause=0.2,
)


async def _malformed_then_good(malformed: Malformed, ambiguous: str) -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.number > 1:  # only the first answer is malformed
            await conn.send(response(body=keyed_body(seen), close=True))
            return False
        await conn.send(*malformed.pieces, pause=malformed.pause)
        if not malformed.close:
            await conn.hold()  # no answer beyond the malformed one: the proxy must not wait
        return False

    text = policy(defaults=f"ambiguous: {ambiguous}", upstream="timeout: 30s")
    async with running(answer, text) as env:
        started = time.monotonic()
        first = await post(env, "bad")
        assert time.monotonic() - started < BOUND
        assert_problem(first, 502, "upstream_unavailable")
        assert not first.replayed
        await assert_retry_settled(env, "bad", first, ambiguous)
        # The proxy stays healthy for other keys.
        other = await post(env, uid())
        assert other.status == 201, other.raw[:300]


@pytest.mark.parametrize("ambiguous", ["store", "release"])
@pytest.mark.parametrize("malformed", MALFORMED, ids=[m.name for m in MALFORMED])
async def test_malformed_upstream_answer_is_502_and_settled_per_ambiguous(
    malformed: Malformed, ambiguous: str
) -> None:
    await _malformed_then_good(malformed, ambiguous)


async def test_head_over_64k_is_refused_even_when_it_ends_in_the_crossing_read() -> None:
    first, last = HEAD_CROSSING.pieces
    assert len(first) <= 64 * 1024 < len(first + last)  # the end comes in the crossing read
    await _malformed_then_good(HEAD_CROSSING, "store")


async def test_status_below_100_is_a_malformed_answer() -> None:
    bad = Malformed("status-000", (b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",))
    await _malformed_then_good(bad, "store")


# --- 6. timeouts and connect failures ---------------------------------------------------------


@pytest.mark.parametrize("ambiguous", ["store", "release"])
async def test_upstream_that_never_answers_is_504_within_the_timeout(ambiguous: str) -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.key == b"silent" and env.upstream.count(b"silent") == 1:
            await conn.hold()
            return False
        await conn.send(response(body=keyed_body(seen)))
        return True

    text = policy(defaults=f"ambiguous: {ambiguous}", upstream="timeout: 1s")
    async with running(answer, text) as env:
        started = time.monotonic()
        first = await post(env, "silent")
        assert time.monotonic() - started < BOUND
        assert_problem(first, 504, "upstream_timeout")
        await assert_retry_settled(env, "silent", first, ambiguous)
        # The timed-out connection is not reused for anyone else.
        other = await post(env, "after-timeout")
        assert other.status == 201
        assert json.loads(other.body)["key"] == "after-timeout"
        # the proxy closed the silent connection (the upstream saw it go)
        await until(lambda: env.upstream.closed_by_peer >= 1)


async def test_connect_failure_is_502_and_the_lease_is_released() -> None:
    port = free_port()
    async with running(answer_ok, upstream_port=port, start_upstream=False) as env:
        first = await post(env, "early")
        assert_problem(first, 502, "upstream_unavailable")
        assert not first.replayed
        await env.upstream.start(port)  # the upstream comes up
        retry = await post(env, "early")
        assert retry.status == 201, retry.raw[:300]
        assert not retry.replayed
        assert_replay_of(await post(env, "early"), retry)
        assert env.upstream.count(b"early") == 1


# --- 7. responses too large to store -----------------------------------------------------------


PAYLOAD = os.urandom(BIG)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


async def answer_big(conn: Conn, seen: Seen) -> bool:
    """5 MiB: Content-Length unless the request path asks for chunked; ?slow paces it."""
    target = seen.request_line.split(b" ")[1]
    pause = 0.002 if b"slow" in target else 0.0
    if b"chunked" in target:
        await conn.send(b"HTTP/1.1 200 OK\r\nX-Big: yes\r\nTransfer-Encoding: chunked\r\n\r\n")
        offset, size = 0, 1000
        while offset < len(PAYLOAD):
            piece = PAYLOAD[offset : offset + size]
            await conn.send(b"%x\r\n%s\r\n" % (len(piece), piece), pause=pause)
            offset += len(piece)
            size = size * 3 % 200_000 + 1
        await conn.send(b"0\r\n\r\n")
    elif b"small" in target:
        await conn.send(response(body=keyed_body(seen)))
    else:
        await conn.send(b"HTTP/1.1 200 OK\r\nX-Big: yes\r\nContent-Length: %d\r\n\r\n" % BIG)
        for offset in range(0, BIG, 64 * 1024):
            await conn.send(PAYLOAD[offset : offset + 64 * 1024], pause=pause)
    return True


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_large_answer_is_streamed_intact_and_not_replayable(framing: str) -> None:
    text = policy(defaults="max_stored_response: 1KiB")
    async with running(answer_big, text) as env, aiohttp.ClientSession() as http:
        url = f"{env.url}/orders/{framing}"
        headers = {"Idempotency-Key": "big"}
        timeout = aiohttp.ClientTimeout(total=BOUND)
        async with http.post(url, data=b"x", headers=headers, timeout=timeout) as reply:
            assert reply.status == 200
            assert reply.headers["X-Big"] == "yes"
            data = await reply.read()
        assert len(data) == BIG
        assert hashlib.sha256(data).hexdigest() == DIGEST
        async with http.post(url, data=b"x", headers=headers, timeout=timeout) as retry:
            assert retry.status == 409
            doc = await retry.json(content_type=None)
            assert doc["code"] == "response_not_replayable"
        assert env.upstream.count(b"big") == 1


async def test_slow_reading_client_gets_a_large_answer_intact() -> None:
    text = policy(defaults="max_stored_response: 1KiB")
    async with running(answer_big, text) as env:
        reader, writer = await asyncio.open_connection(HOST, env.port)
        try:
            writer.write(build("slow-reader", target=b"/orders/length"))
            received = bytearray()
            async with asyncio.timeout(BOUND * 2):
                while chunk := await reader.read(256 * 1024):
                    received += chunk
                    await asyncio.sleep(0.005)  # slower than the upstream: reading must pause
        finally:
            writer.close()
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert hashlib.sha256(body).hexdigest() == DIGEST


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_client_leaving_mid_stream_leaves_the_proxy_healthy(framing: str) -> None:
    text = policy(defaults="max_stored_response: 1KiB")
    async with running(answer_big, text) as env:
        reader, writer = await asyncio.open_connection(HOST, env.port)
        writer.write(build("leaver", target=b"/orders/slow-" + framing.encode()))
        got = 0
        async with asyncio.timeout(BOUND):
            while got < 300_000:
                chunk = await reader.read(65536)
                assert chunk
                got += len(chunk)
        writer.close()  # mid-stream
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        # The proxy drops the upstream connection it was streaming from.
        await until(lambda: env.upstream.closed_by_peer >= 1)
        for _ in range(3):
            reply = await post(env, uid(), target=b"/orders/small")
            assert reply.status == 201, reply.raw[:300]
        retry = await post(env, "leaver", target=b"/orders/slow-" + framing.encode())
        assert_problem(retry, 409, "response_not_replayable")
        assert env.upstream.count(b"leaver") == 1


# --- 8. a client leaving while the upstream is slow ---------------------------------------------


async def test_client_leaving_while_the_upstream_is_slow() -> None:
    answered = asyncio.Event()

    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.key == b"gone":
            await asyncio.sleep(1.0)
            await conn.send(response(body=keyed_body(seen)))
            answered.set()
            return True
        await conn.send(response(body=keyed_body(seen)))
        return True

    async with running(answer) as env:
        _, writer = await asyncio.open_connection(HOST, env.port)
        writer.write(build("gone"))
        await writer.drain()
        await until(lambda: bool(env.upstream.seen))
        writer.close()  # the client gives up while the upstream works
        # Meanwhile other keyed requests are served, on a connection of their own.
        during = await post(env, "during")
        assert during.status == 201
        assert json.loads(during.body)["key"] == "during"
        await asyncio.wait_for(answered.wait(), BOUND)
        # The abandoned request ran once; its retry never runs it again. Until the proxy has
        # recorded the answer it read, a retry is refused as in progress: poll, bounded.
        deadline = time.monotonic() + BOUND
        while (retry := await post(env, "gone")).status == 409:
            assert time.monotonic() < deadline, retry.raw[:300]
            await asyncio.sleep(0.02)
        assert retry.replayed, retry.raw[:300]
        assert retry.status in (201, 502)
        after = await post(env, "after")
        assert json.loads(after.body)["key"] == "after"
        assert env.upstream.count(b"gone") == 1
        assert env.upstream.accepted == 2


# --- Http1Pool directly ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def pool_for(
    answer: Answerer, limit: int = 4, answer_timeout: float = 5.0
) -> AsyncIterator[tuple[RawUpstream, Http1Pool]]:
    upstream = RawUpstream(answer)
    await upstream.start()
    pool = Http1Pool(upstream.url, limit, 2.0, answer_timeout)
    try:
        yield upstream, pool
    finally:
        pool.close()
        await upstream.close()


def raw_request(key: bytes, method: bytes = b"POST") -> bytes:
    return b"%s /x HTTP/1.1\r\nHost: u\r\nIdempotency-Key: %s\r\nContent-Length: 0\r\n\r\n" % (
        method,
        key,
    )


async def test_pool_answer_to_head_has_no_body_despite_content_length() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.request_line.startswith(b"HEAD"):
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: 1\r\n\r\n")
        else:
            await conn.send(response(body=keyed_body(seen)))
        return True

    async with pool_for(answer) as (upstream, pool):
        head = await pool.exchange(raw_request(b"h", b"HEAD"), True, 1024)
        assert (head.status, head.body, head.rest) == (200, b"", None)
        assert head.headers == [(b"Content-Length", b"10"), (b"X-A", b"1")]
        after = await pool.exchange(raw_request(b"p"), False, 1024)
        assert json.loads(after.body)["key"] == "p"
        assert upstream.accepted == 1


async def test_pool_answer_beyond_max_body_comes_with_its_rest() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        await conn.send(response(b"200 OK", body=PAYLOAD[:300_000] + seen.key))
        return True

    async with pool_for(answer) as (upstream, pool):
        whole = await pool.exchange(raw_request(b"r"), False, 1000)
        assert whole.rest is not None
        assert len(whole.body) > 1000
        rest = b"".join([chunk async for chunk in whole.rest])
        whole.rest.close()
        assert whole.body + rest == PAYLOAD[:300_000] + b"r"
        # Read to its end: the connection may serve the next exchange, which gets its own answer.
        small = await pool.exchange(raw_request(b"s"), False, 1_000_000)
        assert small.rest is None
        assert small.body == PAYLOAD[:300_000] + b"s"
        # Abandoned before its end: the connection is dropped, the next one is fresh.
        partial = await pool.exchange(raw_request(b"a"), False, 1000)
        assert partial.rest is not None
        partial.rest.close()
        after = await pool.exchange(raw_request(b"n"), False, 1_000_000)
        assert after.body == PAYLOAD[:300_000] + b"n"
        assert [seen.key for seen in upstream.seen] == [b"r", b"s", b"a", b"n"]
        assert upstream.seen[-1].connection == upstream.seen[-2].connection + 1


async def test_pool_cancelled_exchange_drops_its_connection() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.key == b"slow":
            await asyncio.sleep(0.5)
        await conn.send(response(body=keyed_body(seen)))
        return True

    async with pool_for(answer, limit=1) as (upstream, pool):
        task = asyncio.create_task(pool.exchange(raw_request(b"slow"), False, 1024))
        await until(lambda: bool(upstream.seen))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The slot is free again (limit 1) and the late answer to "slow" reaches nobody.
        answer_ = await asyncio.wait_for(pool.exchange(raw_request(b"next"), False, 1024), BOUND)
        assert json.loads(answer_.body)["key"] == "next"
        assert upstream.accepted == 2


async def test_pool_failure_kinds() -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.key == b"silent":
            await conn.hold()
        return False  # "drop": closed without an answer

    async with pool_for(answer, answer_timeout=0.5) as (_, pool):
        with pytest.raises(UpstreamFailure) as broken:
            await pool.exchange(raw_request(b"drop"), False, 1024)
        assert broken.value.kind == "broken"
        with pytest.raises(UpstreamFailure) as timed_out:
            await asyncio.wait_for(pool.exchange(raw_request(b"silent"), False, 1024), BOUND)
        assert timed_out.value.kind == "timeout"
    nowhere = Http1Pool(f"http://{HOST}:{free_port()}", 2, 2.0, 5.0)
    with pytest.raises(UpstreamFailure) as refused:
        await nowhere.exchange(raw_request(b"x"), False, 1024)
    assert refused.value.kind == "connect"
    # a failed connect frees its slot: the pool can still try (and fail the same way)
    for _ in range(3):
        with pytest.raises(UpstreamFailure):
            await nowhere.exchange(raw_request(b"x"), False, 1024)


# --- the same through a proxy on uvloop (what ``idemproxy run`` uses) ----------------------------


async def _uvloop_scenario() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    chunked = FRAMINGS[1]

    async def answer(conn: Conn, seen: Seen) -> bool:
        await conn.send(*chunked.pieces)
        return True

    async with running(answer) as env:
        first = await post(env, "uv")
        assert first.body == chunked.body
        assert_replay_of(await post(env, "uv"), first)
        await post(env, "uv-2")
        assert env.upstream.accepted == 1
    named = {m.name: m for m in MALFORMED}
    for name in (
        "header-without-colon",
        "conflicting-content-length",
        "closed-mid-content-length-body",
    ):
        malformed = named[name]
        await _malformed_then_good(malformed, "store")


def test_on_uvloop() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_uvloop_scenario())
