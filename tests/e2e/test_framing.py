"""HTTP/1.1 framing attacks (issue 6): the upstream never gets a request framed otherwise.

Raw sockets on both sides. The client side writes crafted bytes to a real proxy; the upstream is a
raw asyncio server that records exactly the bytes it got, parses them strictly (CRLF only, no
obs-fold, one framing) and notes anything that arrives after the request it framed (a smuggled
second request). For every crafted request the proxy either refuses it (a 4xx of its own, or
closing the connection) and the upstream sees nothing, or it forwards it re-framed: the upstream
sees one request, one consistent framing, and exactly the body RFC 9112 says the client sent.
Each case runs against a pass-through route and a keyed route.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import pytest

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from tests.conftest import HOST
from tests.raw_reply import Reply

BOUND = 5.0  # seconds: every answer must come within this
LINGER = 0.2  # seconds the upstream waits for bytes after a request it has framed

POLICY = """
routes:
  - match: {methods: [POST], path: /keyed}
    key: {required: true}
"""


# --- the upstream: raw bytes in, strict parsing, one answer per connection ----------------------


@dataclass
class Received:
    """One request as it arrived at the upstream."""

    head: bytes  # request line and header lines, as sent, up to the blank line
    headers: list[tuple[str, str]]
    body: bytes  # the body by the framing the upstream found
    framing: str  # "chunked", "length" or "none"
    extra: bytes  # bytes after the framed request: a second, smuggled request
    problems: list[str] = field(default_factory=list)  # what a strict parser objects to

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class RawUpstream:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.server: asyncio.Server | None = None
        self.serving: set[asyncio.Task[object]] = set()  # connections being served

    async def idle(self) -> None:
        """Wait (bounded) until no connection is being served, so ``received`` is complete."""
        if self.serving:
            await asyncio.wait(set(self.serving), timeout=BOUND)
        assert not self.serving, "the upstream is still serving a connection"

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        try:
            received = await asyncio.wait_for(self._read(reader), BOUND)
            if received is None:
                return
            self.received.append(received)
            body = b'{"upstream": "raw"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Upstream: raw\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self.serving.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> Received | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        problems: list[str] = []
        lines = head[:-4].split(b"\r\n")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if b"\n" in line or b"\r" in line:
                problems.append(f"bare CR or LF in {line!r}")
            if line[:1] in (b" ", b"\t"):
                problems.append(f"obs-fold line {line!r}")
            name, colon, value = line.partition(b":")
            if not colon or name != name.strip() or not name:
                problems.append(f"malformed header line {line!r}")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        lengths = [v for k, v in headers if k.lower() == "content-length"]
        codings = [v for k, v in headers if k.lower() == "transfer-encoding"]
        if len(lengths) > 1:
            problems.append(f"{len(lengths)} Content-Length headers: {lengths}")
        if lengths and codings:
            problems.append("both Content-Length and Transfer-Encoding")
        if codings:
            if [c.lower() for c in codings] != ["chunked"]:
                problems.append(f"Transfer-Encoding {codings}")
            body, framing = await self._chunked(reader, problems), "chunked"
        elif lengths:
            if not lengths[0].isdigit():
                problems.append(f"Content-Length {lengths[0]!r}")
                return Received(head, headers, b"", "length", b"", problems)
            body, framing = await reader.readexactly(int(lengths[0])), "length"
        else:
            body, framing = b"", "none"
        try:
            extra = await asyncio.wait_for(reader.read(65536), LINGER)
        except TimeoutError:
            extra = b""
        return Received(head, headers, body, framing, extra, problems)

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader, problems: list[str]) -> bytes:
        body = b""
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line[:-2].split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    problems.append("trailers sent upstream")
                return body
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                problems.append("chunk data not followed by CRLF")


@dataclass
class Setup:
    upstream: RawUpstream
    port: int


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    upstream = RawUpstream()
    await upstream.start()
    config = load_text(
        POLICY,
        flags=Overrides(
            listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=upstream.url, store="memory://"
        ),
        environ={},
    )
    prefix = f"test:framing:{uuid.uuid4().hex[:12]}:"
    server = ProxyServer(replace(config, store=replace(config.store, key_prefix=prefix)))
    await server.start()
    try:
        yield Setup(upstream, server.address[1])
    finally:
        await server.stop()
        await upstream.close()


# --- the client side ----------------------------------------------------------------------------


async def send_raw(port: int, data: bytes) -> tuple[Reply | None, bytes]:
    """Write ``data``; the first answer (None: closed without one) and all bytes read.

    Reads until the proxy closes the connection or goes quiet for a moment after answering,
    so a second answer (to a smuggled request) is in the bytes too.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), BOUND)
    received = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    try:
        with contextlib.suppress(OSError):
            writer.write(data)
            await writer.drain()
        while True:
            answered = b"\r\n\r\n" in received
            remaining = deadline - loop.time()
            if remaining <= 0:
                if answered:
                    break
                pytest.fail(f"no answer within {BOUND} s to {data[:200]!r}")
            wait = min(remaining, LINGER * 2) if answered else remaining
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except TimeoutError:
                if answered:
                    break
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            received += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, sep, rest = received.partition(b"\r\n\r\n")
    if not sep:
        return None, received
    status = int(head.split(b" ", 2)[1])
    return Reply(status, head, rest), received


# --- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A crafted request; ``bodies``: what the upstream may get if forwarded (empty: never)."""

    name: str
    build: Callable[[bytes, bytes], bytes]  # (path, extra header lines) -> request bytes
    bodies: frozenset[bytes]
    keep_alive: bool = False  # leave the connection open: a smuggled request would be served
    check: Callable[[Received], None] | None = None  # more about a forwarded request


def _request(
    lines: list[bytes], body: bytes, eol: bytes = b"\r\n"
) -> Callable[[bytes, bytes], bytes]:
    def build(path: bytes, extra: bytes) -> bytes:
        start = b"POST " + path + b" HTTP/1.1"
        head = [start, b"Host: " + HOST.encode()]
        head += [line for line in extra.split(b"\r\n") if line]
        head += lines
        return eol.join(head) + eol + eol + body

    return build


def _unfolded(seen: Received) -> None:
    """RFC 9112 5.2: a proxy replaces obs-fold with SP before forwarding (or refuses)."""
    values = seen.all("X-Folded")
    assert len(values) == 1, values
    assert values[0].split() == ["first", "second"], values


CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


def _fifty_headers(seen: Received) -> None:
    assert [seen.all(f"X-Many-{i}") for i in range(50)] == [[str(i)] for i in range(50)]


# Well-framed requests: forwarded, and re-framed all the same (the control group).
FORWARDED = [
    Case("plain-length", _request([b"Content-Length: 5"], b"hello"), frozenset({b"hello"})),
    Case("empty-body", _request([b"Content-Length: 0"], b""), frozenset({b""})),
    Case(
        "plain-chunked",
        _request([b"Transfer-Encoding: chunked"], CHUNKED_HELLO),
        frozenset({b"hello"}),
    ),
    Case(
        "chunked-upper-case",
        _request([b"Transfer-Encoding: CHUNKED"], CHUNKED_HELLO),
        frozenset({b"hello"}),
    ),
    Case(
        "chunk-extensions",
        _request([b"Transfer-Encoding: chunked"], b"5;name=value\r\nhello\r\n0\r\n\r\n"),
        frozenset({b"hello"}),
    ),
    Case(
        "one-byte-chunks",
        _request(
            [b"Transfer-Encoding: chunked"],
            b"".join(b"1\r\n%c\r\n" % c for c in b"hello") + b"0\r\n\r\n",
        ),
        frozenset({b"hello"}),
    ),
    Case(
        "chunked-trailer",
        _request([b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"),
        frozenset({b"hello"}),
    ),
    Case(
        "fifty-headers",
        _request([b"X-Many-%d: %d" % (i, i) for i in range(50)] + [b"Content-Length: 5"], b"hello"),
        frozenset({b"hello"}),
        check=_fifty_headers,
    ),
]
HOSTILE = [
    Case(
        "cl-and-te",
        _request([b"Content-Length: 4", b"Transfer-Encoding: chunked"], CHUNKED_HELLO),
        frozenset({b"hello"}),
    ),
    Case(
        "te-and-cl",
        _request([b"Transfer-Encoding: chunked", b"Content-Length: 30"], CHUNKED_HELLO),
        frozenset({b"hello"}),
    ),
    Case(
        "cl-and-te-smuggling",
        _request(
            [b"Content-Length: 41", b"Transfer-Encoding: chunked"],
            b"0\r\n\r\nPOST /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        frozenset({b""}),  # chunked wins (RFC 9112 6.3); the rest must never be served
        keep_alive=True,
    ),
    Case(
        "te-chunked-identity",
        _request([b"Transfer-Encoding: chunked, identity", b"Content-Length: 5"], b"hello"),
        frozenset(),
    ),
    Case(
        "te-xchunked",
        _request([b"Transfer-Encoding: xchunked", b"Content-Length: 5"], b"hello"),
        frozenset(),
    ),
    Case(
        "te-space-before-colon",
        _request([b"Transfer-Encoding : chunked", b"Content-Length: 5"], b"hello"),
        frozenset(),
    ),
    Case(
        "te-twice",
        _request([b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"], CHUNKED_HELLO),
        frozenset(),
    ),
    Case(
        "duplicate-cl-different",
        _request([b"Content-Length: 5", b"Content-Length: 6"], b"hello!"),
        frozenset(),
    ),
    Case(
        "cl-list-different",
        _request([b"Content-Length: 5, 6"], b"hello!"),
        frozenset(),
    ),
    Case(
        "duplicate-cl-same",
        _request([b"Content-Length: 5", b"Content-Length: 5"], b"hello"),
        frozenset({b"hello"}),
    ),
    Case("cl-plus-sign", _request([b"Content-Length: +5"], b"hello"), frozenset()),
    Case(
        "obs-fold",
        _request([b"X-Folded: first", b" second", b"Content-Length: 5"], b"hello"),
        frozenset({b"hello"}),
        check=_unfolded,
    ),
    Case(
        "obs-fold-on-te",
        _request([b"Content-Length: 5", b"Transfer-Encoding:", b" chunked"], b"hello"),
        frozenset(),
    ),
    Case(
        "obs-fold-on-cl",
        _request([b"Content-Length:", b" 5"], b"hello"),
        frozenset({b"hello"}),
    ),
    Case(
        "bare-lf",
        _request([b"Content-Length: 5"], b"hello", eol=b"\n"),
        frozenset({b"hello"}),
    ),
    Case(
        "bare-lf-one-header",
        lambda path, extra: _request([b"Content-Length: 5"], b"hello")(
            path, extra + b"\r\nX-Bare: 1\nX-After: 2"
        ),
        frozenset({b"hello"}),
    ),
    Case(
        "bare-cr",
        lambda path, extra: _request([b"Content-Length: 5"], b"hello")(
            path, extra + b"\r\nX-Bare: 1\rX-After: 2"
        ),
        frozenset({b"hello"}),
    ),
    Case(
        "chunk-size-lf-only",
        _request([b"Transfer-Encoding: chunked"], b"5\nhello\n0\n\n"),
        frozenset({b"hello"}),
    ),
    Case(
        "chunk-size-overflow",
        _request([b"Transfer-Encoding: chunked"], b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
        frozenset(),
    ),
    Case(
        "request-line-over-8k",
        lambda path, extra: _request([b"Content-Length: 5"], b"hello")(
            path + b"?q=" + b"a" * 9000, extra
        ),
        frozenset({b"hello"}),
    ),
    Case(
        "two-hundred-headers",
        _request(
            [b"X-Many-%d: %d" % (i, i) for i in range(200)] + [b"Content-Length: 5"], b"hello"
        ),
        frozenset({b"hello"}),
    ),
]


CASES = FORWARDED + HOSTILE


@pytest.mark.parametrize("route", ["pass-through", "keyed"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_framing_is_refused_or_reframed(setup: Setup, case: Case, route: str) -> None:
    if route == "keyed":
        path, extra = b"/keyed", b"Idempotency-Key: frame-" + uuid.uuid4().hex.encode()
    else:
        path, extra = b"/pass", b""
    if not case.keep_alive:
        extra += b"\r\nConnection: close"
    request = case.build(path, extra)
    reply, everything = await send_raw(setup.port, request)
    await setup.upstream.idle()
    received = setup.upstream.received
    if reply is not None:
        assert reply.status < 500 or reply.status == 501, (reply.status, everything[:500])
        assert b"Traceback" not in everything
    # Refused: closed, a 4xx, or 501 for a transfer coding it does not implement (RFC 9112 6.1).
    if reply is None or 400 <= reply.status < 500 or reply.status == 501:
        assert case not in FORWARDED, f"a well-framed request was refused: {everything[:300]!r}"
        assert not received, f"refused, yet the upstream got {received}"
        return
    # Forwarded: one request, re-framed, the body the client sent.
    assert case.bodies, f"{case.name} must be refused, got {reply.status}: {everything[:300]!r}"
    assert reply.status == 200, everything[:500]
    assert b"X-Upstream: raw" in reply.head
    assert len(received) == 1, received
    seen = received[0]
    assert not seen.problems, seen.problems
    assert seen.extra == b"", f"bytes after the request reached the upstream: {seen.extra!r}"
    assert seen.body in case.bodies, seen.body
    assert everything.count(b"HTTP/1.1 ") == 1, f"more than one answer: {everything[:600]!r}"
    if case.check is not None:
        case.check(seen)
