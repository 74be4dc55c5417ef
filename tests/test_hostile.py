"""Hostile and broken input (issue 6): the proxy answers, never with a 5xx of its own or a leak.

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
import base64
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from aiohttp import web
from conftest import HOST, free_port, run_cli
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from idemproxy.app import ProxyServer
from idemproxy.config import ConfigError, Overrides, load_text
from idemproxy.observability import JsonFormatter

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


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def code(self) -> str | None:
        """The ``code`` of a problem+json the proxy made, else None."""
        if self.header("Content-Type") != "application/problem+json" or not self.body:
            return None  # not a problem, or the answer to a HEAD (read without its body)
        return str(json.loads(self.body)["code"])

    @property
    def from_upstream(self) -> bool:
        return self.header("X-Serial") is not None


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
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1").strip(), value.decode("latin-1").strip()))
    reply = Reply(status, headers, b"")
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


# --- 1. arbitrary Idempotency-Key values -------------------------------------------------------

KEY_REQUIRED = """
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
"""
# Bytes RFC 9110 forbids in a field value (CTL other than HTAB): the HTTP parser may refuse them
# with its own 400 before the proxy's code sees the header.
FORBIDDEN_IN_FIELDS = frozenset([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def spec_key(raw: bytes) -> str | None:
    """The key SPEC section 4 says ``raw`` names, or None when it is ``idempotency_key_invalid``.

    HTTP drops optional whitespace (SP, HTAB) around a field value; then the RFC 8941 string form
    ``"abc"`` is unquoted (escapes: only backslash-quote and backslash-backslash); then the key
    must be 1-255 characters of 0x21-0x7E.
    """
    text = raw.strip(b" \t").decode("utf-8", "surrogateescape")
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            return None
        out: list[str] = []
        inner = iter(text[1:-1])
        for char in inner:
            if char == "\\":
                escaped = next(inner, None)
                if escaped not in ('"', "\\"):
                    return None
                out.append(escaped)
            elif char == '"':
                return None
            else:
                out.append(char)
        text = "".join(out)
    if not text or len(text) > 255 or not all("\x21" <= c <= "\x7e" for c in text):
        return None
    return text


def sf_quote(text: str) -> bytes:
    return ('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"').encode()


VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
# Non-ASCII that is not Unicode whitespace: see test_unicode_whitespace_around_a_key_is_invalid.
NON_ASCII = st.characters(min_codepoint=0x80, exclude_categories=["Cs", "Zs", "Zl", "Zp", "Cc"])
NO_LINE_BREAKS = st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b)
OWS = st.sampled_from([b"", b" ", b"\t", b"  "])

KEY_VALUES = st.one_of(
    st.text(VISIBLE, min_size=1, max_size=255).map(str.encode),
    st.text(VISIBLE, min_size=256, max_size=700).map(str.encode),
    st.text(VISIBLE, max_size=40).map(sf_quote),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(
        lambda s: b'"' + s.encode()
    ),
    st.text(VISIBLE, max_size=30).map(lambda s: s.encode() + b'"'),
    st.text(st.one_of(VISIBLE, NON_ASCII), min_size=1, max_size=40).map(str.encode),
    st.lists(st.sampled_from([b"a", b" ", b"\t", b'"', b"\\", b"\x00", b"\x1f", b"\x7f", b"\xff"]))
    .map(b"".join)
    .filter(lambda b: b.strip(b" \t") == b or b.strip(b" \t")),
    NO_LINE_BREAKS.filter(lambda b: not any(0x1C <= c <= 0x1F or c in (0x0B, 0x0C) for c in b)),
)


@settings(FUZZ, max_examples=120)
@given(value=KEY_VALUES, before=OWS, after=OWS)
@example(value=b"", before=b"", after=b"")
@example(value=b'""', before=b"", after=b"")
@example(value=b'"', before=b"", after=b"")
@example(value=b'"abc', before=b"", after=b"")
@example(value=b'abc"', before=b"", after=b"")
@example(value=b'"a"b"', before=b"", after=b"")
@example(value=b'"a\\"', before=b"", after=b"")
@example(value=b'"a\\b"', before=b"", after=b"")
@example(value=b'"a b"', before=b"", after=b"")
@example(value=b"x" * 255, before=b"", after=b"")
@example(value=b"x" * 256, before=b"", after=b"")
@example(value=b"x" * 4000, before=b"", after=b"")
@example(value="ключ".encode(), before=b"", after=b"")
@example(value=b"\xff\xfe", before=b"", after=b"")
@example(value=b"a\x00b", before=b"", after=b"")
@example(value=b"a\x7fb", before=b"", after=b"")
@example(value=b"a\tb", before=b"", after=b"")
def _key_property(
    harness: Harness, proxy: Proxy, value: bytes, before: bytes, after: bytes
) -> None:
    header = before + value + after
    request = build(b"POST", b"/orders", [(b"Idempotency-Key", header)], b'{"a": 1}')
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request), request)
    event(f"status {reply.status} {reply.code or ''}")
    key = spec_key(header)
    if key is None:
        assert reply.status == 400, (header, reply.status, reply.body)
        if not FORBIDDEN_IN_FIELDS.intersection(header):
            assert reply.code == "idempotency_key_invalid", (header, reply.body)
        assert len(harness.recorder.calls) == calls, "an invalid key reached the upstream"
    else:
        assert reply.status == 201, (header, reply.status, reply.body)
        assert reply.from_upstream
        fresh = reply.header("Idempotent-Replayed") is None
        assert len(harness.recorder.calls) == calls + fresh


def test_arbitrary_idempotency_key_values(harness: Harness) -> None:
    proxy = harness.proxy(KEY_REQUIRED)
    _key_property(harness, proxy)


@pytest.mark.parametrize(
    "value",
    ["abc\u00a0", "\u3000abc", "abc\u2028", "abc\u0085", '"abc"\u00a0'],
    ids=["nbsp", "ideographic-space", "line-separator", "nel", "quoted-nbsp"],
)
def test_unicode_whitespace_around_a_key_is_invalid(memory_harness: Harness, value: str) -> None:
    proxy = memory_harness.proxy(KEY_REQUIRED)
    request = build(b"POST", b"/orders", [(b"Idempotency-Key", value.encode())], b"{}")
    reply = assert_sane(exchange(proxy.port, request), request)
    assert (reply.status, reply.code) == (400, "idempotency_key_invalid"), reply.body
    assert not memory_harness.recorder.calls


# --- 2. arbitrary bodies on a JSON-pointer key route -------------------------------------------

BODY_KEY = """
routes:
  - match: {methods: [POST], path: /users}
    key: {from: body, pointer: /client_id}
"""
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
INVALID_CLIENT_IDS = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), JSON_SCALARS, max_size=3),
    st.just(""),
    st.text(VISIBLE, min_size=256, max_size=400),
    st.text(min_size=1, max_size=20).filter(lambda s: not all("\x21" <= c <= "\x7e" for c in s)),
    st.integers(min_value=10**256, max_value=10**400),  # more than 255 digits
)


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """A JSON object body and what it must get: ``new`` (keyed or not), or ``invalid``."""
    document = draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5))
    document.pop("client_id", None)
    kind = draw(st.sampled_from(["valid-str", "valid-int", "invalid", "absent"]))
    if kind == "valid-str":
        suffix = draw(st.text(VISIBLE, max_size=40))
        document["client_id"] = f"{uuid.uuid4().hex}{suffix}"[:255]
    elif kind == "valid-int":
        document["client_id"] = int(uuid.uuid4().int % 10**30)
    elif kind == "invalid":
        document["client_id"] = draw(INVALID_CLIENT_IDS)
    body = json.dumps(
        document,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 2])),
        sort_keys=draw(st.booleans()),
    ).encode()
    return body, "invalid" if kind == "invalid" else "new"


@FUZZ
@given(case=json_bodies())
def _json_body_property(harness: Harness, proxy: Proxy, case: tuple[bytes, str]) -> None:
    body, expected = case
    request = build(b"POST", b"/users", [(b"Content-Type", b"application/json")], body)
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request), request)
    if expected == "invalid":
        assert (reply.status, reply.code) == (400, "idempotency_key_invalid"), reply.body
        assert len(harness.recorder.calls) == calls
    else:
        assert reply.status == 201, (reply.status, reply.body)
        assert reply.header("Idempotent-Replayed") is None
        assert len(harness.recorder.calls) == calls + 1
        assert harness.recorder.calls[-1].body == body


def test_json_bodies_on_a_pointer_key_route(harness: Harness) -> None:
    proxy = harness.proxy(BODY_KEY)
    _json_body_property(harness, proxy)


JSON_TOKENS = st.sampled_from([
    b"{", b"}", b"[", b"]", b":", b",", b" ", b'"client_id"', b'"x"', b'"k-1"', b"1", b"-0",
    b"1e999999", b"1E-999999", b"9" * 60, b"null", b"true", b"NaN", b'"\\u0000"',
    b'"\\ud800"', b'"\\"', b'"', b"\\", b"\xef\xbb\xbf",
])  # fmt: skip
HUGE_INTEGER = b"9" * 5000
HOSTILE_BODIES = st.one_of(
    st.binary(max_size=300).filter(lambda b: _is_utf8(b)),
    st.text(max_size=200).map(str.encode),
    st.lists(JSON_TOKENS, max_size=40).map(b"".join),
)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(body=HOSTILE_BODIES)
@example(body=b"")
@example(body=b"[" * 100_000)
@example(body=b'{"client_id": "deep-1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
@example(body=b'{"client_id": "deep-2", "x": ' + b"[" * 900 + b"]" * 900 + b"}")
@example(body=b'{"client_id": "deep-3", "x": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}")
@example(body=b'{"client_id": 1e999999}')
@example(body=b'{"client_id": "huge-1", "n": 1e999999}')
@example(body=b'{"client_id": ' + HUGE_INTEGER + b"}")
@example(body=b'{"client_id": "huge-2", "n": ' + HUGE_INTEGER + b"}")
@example(body=b'{"client_id": "huge-3", "n": 0.' + HUGE_INTEGER + b"}")
@example(body=b'{"client_id": "dup-1", "client_id": "dup-2"}')
@example(body=b'{"client_id": "dup-3", "a": 1, "a": 2}')
@example(body=b'{"client_id": "nan-1", "n": NaN}')
@example(body=b'{"client_id": "\\u0000"}')
@example(body=b'{"client_id": "\\ud800"}')
@example(body=b'{"client_id": "lone-1", "x": "\\ud800"}')
@example(body=b'\xef\xbb\xbf{"client_id": "bom-1"}')
@example(body=b'{"client_id": "trailing-1"} garbage')
@example(body=b'{"client_id": "trailing-2"}{"client_id": "trailing-3"}')
@example(body=b'"client_id"')
@example(body=b'[{"client_id": "in-a-list"}]')
def _hostile_body_property(harness: Harness, proxy: Proxy, body: bytes) -> None:
    request = build(b"POST", b"/users", [], body)
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request), request)
    event(f"status {reply.status} {reply.code or ''}")
    if reply.status == 201:
        if reply.header("Idempotent-Replayed") is None:
            assert len(harness.recorder.calls) == calls + 1
            assert harness.recorder.calls[-1].body == body
        else:
            assert len(harness.recorder.calls) == calls
    else:
        assert (reply.status, reply.code) in {
            (400, "idempotency_key_invalid"),
            (422, "idempotency_key_reused"),
        }, (reply.status, reply.body)
        assert b"client_id" in body
        assert len(harness.recorder.calls) == calls


def test_hostile_bodies_on_a_pointer_key_route(harness: Harness) -> None:
    proxy = harness.proxy(BODY_KEY)
    _hostile_body_property(harness, proxy)


@pytest.mark.parametrize(
    "body",
    [
        b'{"client_id": "\xff"}',
        b'{"client_id": "ok-1", "note": "\xc3\x28"}',
        b'{"client_id": "ok-2", "note": "\xed\xa0\x80"}',
        b'"\x80"',
    ],
    ids=["in-the-key", "in-another-field", "encoded-surrogate", "bare-string"],
)
def test_invalid_utf8_in_a_json_body(harness: Harness, body: bytes) -> None:
    proxy = harness.proxy(BODY_KEY)
    request = build(b"POST", b"/users", [], body)
    reply = assert_sane(exchange(proxy.port, request), request)
    if reply.status == 201:
        assert harness.recorder.calls[-1].body == body
    else:
        assert reply.status == 400, reply.body


# --- 3. odd methods and paths ------------------------------------------------------------------

ROUTES = """
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
  - match: {methods: [PUT, DELETE], path: "/orders/{id}"}
"""
KNOWN_METHODS = st.sampled_from([
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    "PROPFIND", "MKCOL", "LOCK", "PURGE", "QUERY", "M-SEARCH", "SEARCH", "REPORT",
])  # fmt: skip
GARBAGE_METHODS = st.one_of(
    st.sampled_from(["post", "Post", "FOO", "GET\x00", "P OST", "", "POST\t"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
)
METHODS = st.one_of(KNOWN_METHODS, KNOWN_METHODS, KNOWN_METHODS, GARBAGE_METHODS)
SEGMENTS = st.one_of(
    st.sampled_from(["", ".", "..", "orders", "%2e", "%2E%2e", "%2F", "%2f..", "%00", "%zz"]),
    st.sampled_from(["%", "%%", "%u002e", ";x", "a;b=c", "\\..\\", "~", "!$&'()*+,=:@"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#")).map(
        lambda s: s.replace(" ", "")
    ),
    st.binary(min_size=1, max_size=6).map(lambda b: "".join(f"%{byte:02X}" for byte in b)),
    st.text(NON_ASCII, min_size=1, max_size=6),
    st.integers(min_value=500, max_value=3000).map(lambda n: "a" * n),
)
PATHS = st.tuples(
    st.lists(SEGMENTS, min_size=0, max_size=8),
    st.one_of(st.just(""), st.text(VISIBLE, max_size=40).map(lambda q: "?" + q)),
).map(lambda parts: "/" + "/".join(parts[0]) + parts[1])


@settings(FUZZ, max_examples=120)
@given(method=METHODS, path=PATHS, keyed=st.booleans())
@example(method="POST", path="/x/../orders", keyed=False)
@example(method="POST", path="//orders//", keyed=False)
@example(method="POST", path="/orders/%2e%2e", keyed=True)
@example(method="DELETE", path="/orders/" + "a" * 4000, keyed=True)
@example(method="GET", path="/" + "a" * 6000, keyed=False)
@example(method="POST", path="/" + "a" * 9000, keyed=False)
@example(method="CONNECT", path="/orders", keyed=True)
def _odd_request_property(
    harness: Harness, proxy: Proxy, method: str, path: str, keyed: bool
) -> None:
    target = path.encode("utf-8", "surrogateescape")
    headers = [(b"Idempotency-Key", uuid.uuid4().hex.encode())] if keyed else []
    request = build(method.encode(), target, headers, b"{}")
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request, head_request=method == "HEAD"), request)
    event(f"status {reply.status} {reply.code or ''}")
    if reply.from_upstream:
        assert reply.status == 201
        assert len(harness.recorder.calls) == calls + 1, "forwarded more than once"
        seen = harness.recorder.calls[-1]
        # The upstream sees the very request target and method the proxy was sent; a fragment
        # (not allowed in a request target) may be dropped, and an empty query's "?".
        base, _, query = path.partition("#")[0].partition("?")
        target_seen = f"{base}?{query}" if query else base
        assert (seen.method, seen.raw_path) == (method, target_seen)
    else:
        assert 400 <= reply.status < 500, (reply.status, reply.body)
        assert len(harness.recorder.calls) == calls
        if reply.code == "idempotency_key_missing":
            assert (method, keyed) == ("POST", False)


def test_odd_methods_and_paths(harness: Harness) -> None:
    proxy = harness.proxy(ROUTES)
    _odd_request_property(harness, proxy)


@pytest.mark.parametrize(
    ("method", "target", "keyed"),
    [
        (b"POST", b"http://127.0.0.1/orders?a=1", True),
        (b"GET", b"http://evil.example:1/x", False),
        (b"OPTIONS", b"*", False),
        (b"CONNECT", b"evil.example:443", False),
    ],
    ids=["absolute-form-keyed", "absolute-form-get", "asterisk-form", "authority-form"],
)
def test_non_origin_form_request_targets(
    memory_harness: Harness, method: bytes, target: bytes, keyed: bool
) -> None:
    proxy = memory_harness.proxy(ROUTES)
    headers = [(b"Idempotency-Key", b"target-form-1")] if keyed else []
    request = build(method, target, headers, b"{}")
    assert_sane(exchange(proxy.port, request), request)


@pytest.mark.parametrize("target", [b"/x/../orders", b"/./orders", b"/x/%2e%2e/orders"])
def test_dot_segments_do_not_slip_past_a_keyed_route(
    memory_harness: Harness, target: bytes
) -> None:
    proxy = memory_harness.proxy(KEY_REQUIRED)
    request = build(b"POST", target, [], b"{}")
    reply = assert_sane(exchange(proxy.port, request), request)
    assert not memory_harness.recorder.calls, "a key-required route was reached without a key"
    assert 400 <= reply.status < 500


# --- 4. arbitrary YAML for `idemproxy check` -------------------------------------------------

FIELD_NAMES = [
    "version", "listen", "shutdown_timeout", "admin", "token", "upstream", "url", "timeout",
    "connect_timeout", "max_connections", "store", "mode", "sentinels", "service_name",
    "key_prefix", "on_error", "defaults", "key", "header", "from", "pointer", "name", "required",
    "window", "ttl", "lock_ttl", "concurrency", "wait_timeout", "fingerprint", "include",
    "headers", "json_canonical", "scope", "release_statuses", "ambiguous", "max_request_body",
    "max_stored_response", "routes", "match", "methods", "path", "idempotency",
    "require_if_match", "etag_from_get", "replay", "status", "x-anchor", "<<",
]  # fmt: skip
WORDS = [
    "30s", "250ms", "7d", "-1s", "0s", "1MiB", "512KiB", "-5", "POST", "PATCH", "GET", "BREW",
    "/orders", "/**", "/{id}", "/a/**/b", "orders", "{id}", "header", "body", "query",
    "fingerprint", "memory://", "redis://127.0.0.1:1/0", "ftp://x", "127.0.0.1:0", "[::1]:0",
    ":99999", "off", "on", "wait", "reject", "store", "release", "fail_open", "fail_closed",
    "standalone", "sentinel", "method", "path", "header:Authorization", "/client_id", "~1",
    "${NOPE}", "${NOPE:-x}", "${", "http://127.0.0.1:8000", "",
]  # fmt: skip
YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**60), max_value=10**60),  # 4300+ digits: a case below
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(WORDS),
)
YAML_KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=12), st.integers(-5, 5))
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(YAML_KEYS, inner, max_size=6),
    max_leaves=30,
)
YAML_DOCUMENTS = st.builds(
    lambda doc, flow, unicode: yaml.safe_dump(
        doc, default_flow_style=flow, allow_unicode=unicode, sort_keys=False
    ),
    st.one_of(st.dictionaries(YAML_KEYS, YAML_VALUES, max_size=8), YAML_VALUES),
    st.sampled_from([None, False, True]),
    st.booleans(),
)
# Characters a YAML stream may hold at all (YAML 1.1 "printable"); the others: a case below.
YAML_PRINTABLE = st.characters(
    codec="utf-8",
    exclude_categories=["Cs"],
    exclude_characters="".join(chr(c) for c in [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20)])
    + "\x7f"
    + "".join(chr(c) for c in range(0x80, 0xA0) if c != 0x85)
    + "\ufffe\uffff",
)
YAML_SNIPPETS = st.sampled_from([
    ":", "- ", "? ", "&a ", "*a", "!!str ", "!!binary ", "!!python/object:os.system ", "{", "}",
    "[", "]", "\n", "  ", "'", '"', "#", "|", ">", "---", "...", "%YAML 1.1", "<<: ", ",",
    "routes:", "match:", "path:", "key:", "ttl:", "30s", "\t", "!!set ", "!!null ",
])  # fmt: skip
YAML_TEXTS = st.one_of(
    YAML_DOCUMENTS,
    st.text(YAML_PRINTABLE, max_size=200),
    st.lists(st.one_of(YAML_SNIPPETS, st.text(YAML_PRINTABLE, max_size=5)), max_size=40).map(
        "".join
    ),
)


def assert_config_errors_are_located(exc: ConfigError) -> None:
    """Every problem names its field path, unless it is about the document itself."""
    assert exc.problems, "a ConfigError with no problem in it"
    document_level = ("not valid YAML", "not valid here", "expected a mapping", "nested too")
    for problem in exc.problems:
        located = problem.path or problem.message.startswith(document_level)
        assert located, problem
        assert "Traceback" not in problem.message


@settings(FUZZ, max_examples=400)
@given(text=YAML_TEXTS)
@example(text="")
@example(text="---\n...\n")
@example(text="~")
@example(text="[]")
@example(text="routes: [[[[]]]]")
@example(text="a: &a 1\nb: *a\n")
@example(text="x-anchor: &d {ttl: 1s}\ndefaults:\n  <<: *d\n")
@example(text="defaults: {<<: 5}")
@example(text="routes:\n  - <<: [1, 2]\n")
@example(text="? [1, 2]\n: 3\n")
@example(text="listen: !!binary aGVsbG8=")
@example(text="listen: !!set {a, b}")
@example(text="listen: 2001-12-14t21:59:43.10-05:00")
@example(text='listen: !!python/object/apply:os.system ["true"]')
@example(text="version: 1\nversion: 2\n")
@example(text="routes: {match: {path: /x}}")
@example(text="defaults: {ttl: .nan, lock_ttl: -.inf, max_request_body: 1e400}")
@example(text="\ufeffversion: 1\n")
def _yaml_property(text: str) -> None:
    try:
        load_text(text, environ={})
    except ConfigError as exc:
        assert_config_errors_are_located(exc)


def test_check_in_process_on_arbitrary_yaml() -> None:
    """The loader raises ConfigError, located, and nothing else (a traceback in ``check``)."""
    _yaml_property()


@settings(FUZZ, max_examples=4)
@given(text=YAML_TEXTS)
@example(text="routes: [{match: {path: /x}, ttl: forever}]\n")
def _cli_property(directory: Path, text: str) -> None:
    path = directory / f"policy-{uuid.uuid4().hex}.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode in (0, 1), result
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert result.stdout.startswith("ok: "), result.stdout
    else:
        lines = result.stderr.rstrip("\n").split("\n")  # not splitlines: field names may hold \x1e
        assert lines != [""], "exit 1 without saying why"
        for line in lines:
            assert line.startswith(f"{path}:"), line


def test_check_cli_on_arbitrary_yaml(tmp_path: Path) -> None:
    _cli_property(tmp_path)


LOADER_BREAKERS = [
    "nul", "escape-char", "deep-nesting", "self-alias-list", "self-alias-route", "huge-int",
    "int-tag", "float-tag", "bool-tag", "timestamp-tag",
]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "version: \x00\n",
        "version: 1\x1b\n",
        "[" * 5000,
        "x-loop: &a [*a]\n",
        "routes: &r\n  - match: *r\n",
        "version: " + "9" * 5000 + "\n",
        "version: !!int abc\n",
        "shutdown_timeout: !!float abc\n",
        "x-flag: !!bool maybe\n",
        "listen: !!timestamp x\n",
    ],
    ids=LOADER_BREAKERS,
)
def test_check_on_yaml_that_breaks_the_loader(tmp_path: Path, text: str) -> None:
    try:
        load_text(text, environ={})
    except ConfigError as exc:
        assert_config_errors_are_located(exc)
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr


def test_an_empty_field_name_at_the_root_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text("'': 1\nversion: 1\n", environ={})
    assert_config_errors_are_located(caught.value)


# --- 5. tenant isolation -----------------------------------------------------------------------

CREDENTIALS = st.one_of(
    st.none(),  # no Authorization header at all
    st.text(VISIBLE, max_size=30).map(lambda s: b"Bearer " + s.encode()),
    st.text(st.one_of(VISIBLE, NON_ASCII, st.just(" ")), max_size=30).map(str.encode),
    st.binary(max_size=30).filter(lambda b: not FORBIDDEN_IN_FIELDS.intersection(b)),
)


def _credential(value: bytes | None) -> bytes:
    """What a credential is once HTTP has dropped the whitespace around it; absent = empty."""
    return (value or b"").strip(b" \t")


def _keyed_post(proxy: Proxy, key: bytes, auth: bytes | None, path: bytes = b"/orders") -> Reply:
    headers = [(b"Idempotency-Key", key)]
    if auth is not None:
        headers.append((b"Authorization", auth))
    request = build(b"POST", path, headers, b'{"amount": 100}')
    return assert_sane(exchange(proxy.port, request), request)


@FUZZ
@given(first=CREDENTIALS, second=CREDENTIALS)
@example(first=None, second=b"Bearer a")
@example(first=b"Bearer a", second=b"bearer a")
@example(first=b"Bearer a", second=b"Bearer  a")
@example(first=b"Bearer a", second=b"Bearer a, Bearer b")
@example(first=b"\xff", second=b"\xc3\xbf")
def _isolation_property(
    harness: Harness, proxy: Proxy, first: bytes | None, second: bytes | None
) -> None:
    if _credential(first) == _credential(second):
        return  # the same credential: a replay is right
    key = uuid.uuid4().hex.encode()
    a = _keyed_post(proxy, key, first)
    assert (a.status, a.from_upstream, a.header("Idempotent-Replayed")) == (201, True, None)
    b = _keyed_post(proxy, key, second)
    assert (b.status, b.from_upstream) == (201, True), b.body
    assert b.header("Idempotent-Replayed") is None, "replayed across credentials"
    assert b.header("X-Serial") != a.header("X-Serial")
    serial_a = json.loads(a.body)["secret"]
    assert serial_a.encode() not in b.body
    assert all(serial_a not in value for _, value in b.headers)
    # The control: under its own credential the key does replay.
    again = _keyed_post(proxy, key, first)
    assert again.header("Idempotent-Replayed") == "true"
    assert again.body == a.body


def test_same_key_under_two_credentials_never_replays_across(harness: Harness) -> None:
    proxy = harness.proxy(KEY_REQUIRED)
    _isolation_property(harness, proxy)


TWO_ROUTES = """
routes:
  - match: {methods: [POST], path: /orders}
  - match: {methods: [POST], path: /refunds}
"""


def _reveals_nothing_of(reply: Reply, first: Reply) -> None:
    secret = json.loads(first.body)["secret"]
    hex_part = secret.rsplit("-", 2)[-2]
    everything = reply.body + b"\n".join(f"{k}: {v}".encode() for k, v in reply.headers)
    for start in range(len(hex_part) - 7):
        assert hex_part[start : start + 8].encode() not in everything, everything
    assert b'"serial"' not in reply.body
    for name in ("Set-Cookie", "Location", "X-Serial", "Idempotent-Replayed"):
        assert reply.header(name) is None, name


@pytest.mark.parametrize(
    ("second_path", "second_body"),
    [(b"/refunds", b'{"amount": 100}'), (b"/orders", b'{"amount": 999}')],
    ids=["other-route", "other-body"],
)
def test_a_reused_key_gets_422_that_reveals_nothing(
    harness: Harness, second_path: bytes, second_body: bytes
) -> None:
    proxy = harness.proxy(TWO_ROUTES)
    headers = [(b"Idempotency-Key", b"reused-1"), (b"Authorization", b"Bearer tenant-a")]
    first_request = build(b"POST", b"/orders", headers, b'{"amount": 100}')
    first = assert_sane(exchange(proxy.port, first_request), first_request)
    assert (first.status, first.from_upstream) == (201, True)
    request = build(b"POST", second_path, headers, second_body)
    reply = assert_sane(exchange(proxy.port, request), request)
    assert (reply.status, reply.code) == (422, "idempotency_key_reused"), reply.body
    _reveals_nothing_of(reply, first)
    assert len(harness.recorder.calls) == 1


def test_a_key_reused_while_in_flight_reveals_nothing(harness: Harness) -> None:
    proxy = harness.proxy(TWO_ROUTES)
    headers = [(b"Idempotency-Key", b"reused-2"), (b"X-Test-Delay", b"0.6")]
    first_request = build(b"POST", b"/orders", headers, b'{"amount": 100}')
    answers: list[Reply | None] = []
    worker = threading.Thread(target=lambda: answers.append(exchange(proxy.port, first_request)))
    worker.start()
    try:
        deadline = time.monotonic() + BOUND
        while not harness.recorder.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert harness.recorder.calls, "the first request never reached the upstream"
        request = build(b"POST", b"/refunds", headers[:1], b'{"amount": 100}')
        reply = assert_sane(exchange(proxy.port, request), request)
    finally:
        worker.join(BOUND)
    first = assert_sane(answers[0] if answers else None, first_request)
    assert first.status == 201
    assert (reply.status, reply.code) == (422, "idempotency_key_reused"), reply.body
    _reveals_nothing_of(reply, first)


ADMIN_TOKEN = "adm1n-T0ken-5ecret-value"
ADMIN_POLICY = f"""
admin:
  token: {ADMIN_TOKEN}
{KEY_REQUIRED}
"""
RECORD_FIELDS = [
    "key_hash", "state", "fingerprint", "created_at", "age_seconds", "expires_in_seconds",
    "headers", "body_base64", "completed", "in_flight",
]  # fmt: skip


def _admin(proxy: Proxy, method: bytes, key: str, authorization: bytes | None) -> Reply:
    headers = [] if authorization is None else [(b"Authorization", authorization)]
    target = f"/keys/{key}?scope=Bearer%20tenant-a&body=1".encode()
    request = build(method, target, headers)
    return assert_sane(exchange(proxy.admin_port, request), request)


WRONG_ADMIN_CREDENTIALS = [
    None,
    b"",
    b" ",
    b"Bearer",
    b"Bearer ",
    b"Bearer wrong",
    b"Bearer " + ADMIN_TOKEN[:-1].encode(),
    b"Bearer " + ADMIN_TOKEN.encode() + b"x",
    b"Bearer " + ADMIN_TOKEN.upper().encode(),
    b"Bearer " + ADMIN_TOKEN[:-1].encode() + b"F",
    b"Bearer" + ADMIN_TOKEN.encode(),
    b"Bearer " + ADMIN_TOKEN.encode() + "é".encode(),
    b"Basic " + ADMIN_TOKEN.encode(),
    ADMIN_TOKEN.encode(),
]


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
def test_the_keys_api_refuses_wrong_admin_tokens_and_reveals_nothing(
    harness: Harness, method: bytes
) -> None:
    proxy = harness.proxy(ADMIN_POLICY)
    first = _keyed_post(proxy, b"admin-1", b"Bearer tenant-a")
    assert first.status == 201
    secret = json.loads(first.body)["secret"].encode()
    unknown_key_answers = set()
    for credential in WRONG_ADMIN_CREDENTIALS:
        for key in ("admin-1", "no-such-key"):
            reply = _admin(proxy, method, key, credential)
            assert (reply.status, reply.code) == (401, "unauthorized"), (credential, reply.body)
            for name in RECORD_FIELDS:
                assert name.encode() not in reply.body, (credential, name, reply.body)
            assert secret not in reply.body
            assert ADMIN_TOKEN.encode() not in reply.body
            # No oracle either: a known and an unknown key get the same refusal.
            unknown_key_answers.add(reply.body)
    assert len(unknown_key_answers) == 1, unknown_key_answers
    # The control: the right token sees the record, which the refusals did not delete.
    reply = _admin(proxy, b"GET", "admin-1", b"Bearer " + ADMIN_TOKEN.encode())
    assert reply.status == 200, reply.body
    described = json.loads(reply.body)
    assert {"key_hash", "fingerprint", "body_base64"} <= described.keys()
    assert secret in base64.b64decode(described["body_base64"])


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
def test_the_keys_api_refuses_a_non_utf8_token(memory_harness: Harness, method: bytes) -> None:
    proxy = memory_harness.proxy(ADMIN_POLICY)
    reply = _admin(proxy, method, "admin-1", b"Bearer \xff" + ADMIN_TOKEN.encode())
    assert (reply.status, reply.code) == (401, "unauthorized"), reply.body


# --- 6. nothing secret in logs -----------------------------------------------------------------

LOGGERS = ("idemproxy", "idemproxy.access")


def test_no_secret_reaches_the_logs_or_metrics(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:10]
    secrets = {
        "key": f"KEYSECRET-{tag}",
        "key2": f"KEYTWOSECRET-{tag}",
        "body": f"BODYSECRET-{tag}",
        "authorization": f"AUTHSECRET-{tag}",
        "cookie": f"COOKIESECRET-{tag}",
        "query": f"QUERYSECRET-{tag}",
        "password": "hunter2",
    }
    for name in LOGGERS:
        caplog.set_level(logging.INFO, logger=name)
    proxy = harness.proxy(KEY_REQUIRED)
    base = [
        (b"Authorization", f"Bearer {secrets['authorization']}".encode()),
        (b"Cookie", f"sid={secrets['cookie']}; theme=dark".encode()),
        (b"Content-Type", b"application/json"),
    ]
    target = f"/orders?token={secrets['query']}".encode()
    body = json.dumps({"card": secrets["body"]}).encode()
    key = (b"Idempotency-Key", secrets["key"].encode())
    answers = []
    for headers, payload in [
        ([key, *base], body),  # new
        ([key, *base], body),  # replayed
        ([key, *base], body.replace(b"BODY", b"OTHER")),  # same key, other body: 422
        ([(b"Idempotency-Key", f"{secrets['key']} x".encode()), *base], body),  # invalid: 400
        ([(b"Idempotency-Key", secrets["key2"].encode()), (b"X-Test-Drop", b"1"), *base], body),
        (base, body),  # no key: 400
    ]:
        request = build(b"POST", target, headers, payload)
        answers.append(exchange(proxy.port, request))
    get = build(b"GET", target, base)
    answers.append(exchange(proxy.port, get))
    statuses = [reply.status if reply else None for reply in answers]
    assert statuses == [201, 201, 422, 400, 502, 400, 201]

    # A store that is down, behind a URL with a password: 503, and the password stays out.
    down = harness.proxy(KEY_REQUIRED, store=f"redis://user:hunter2@{HOST}:{free_port()}/0")
    request = build(b"POST", target, [key, *base], body)
    reply = exchange(down.port, request)
    assert reply is not None
    assert reply.status == 503
    metrics = exchange(proxy.admin_port, build(b"GET", b"/metrics"))
    assert metrics is not None
    assert metrics.status == 200

    records = [r for r in caplog.records if r.name in LOGGERS or r.name.startswith("idemproxy.")]
    access = [r for r in records if r.name == "idemproxy.access"]
    assert len(access) >= len(statuses) + 1, "the requests were not logged at all"
    lines = "\n".join(JsonFormatter().format(record) for record in records)
    assert '"key_hash"' in lines
    for name, secret in secrets.items():
        assert secret not in lines, f"the {name} reached the logs"
        assert secret.encode() not in metrics.body, f"the {name} reached the metrics"


STORE_URL_WITH_PASSWORD = "redis://user:hunter2@127.0.0.1:1/0"


@pytest.mark.parametrize(
    "policy",
    [
        f"store: {{url: '{STORE_URL_WITH_PASSWORD}', mode: sentinel}}",
        f"store: {{url: '{STORE_URL_WITH_PASSWORD}', mode: clustr, on_error: maybe}}",
        f"store: {{url: '{STORE_URL_WITH_PASSWORD}', sentinels: [a], service_name: m}}",
        "store: {url: 'redis+sentinel://user:hunter2@127.0.0.1:1/0'}",
        "store: {url: 'user:hunter2@127.0.0.1:1/0'}",
        pytest.param("store: {url: '//user:hunter2@127.0.0.1:1/0'}", id="store-url-without-scheme"),
        pytest.param(
            "upstream: {url: 'ftp://user:hunter2@127.0.0.1/'}", id="upstream-url-bad-scheme"
        ),
    ],
)
def test_config_errors_do_not_echo_a_password(tmp_path: Path, policy: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(policy, environ={})
    assert "hunter2" not in str(caught.value)
    path = tmp_path / "policy.yaml"
    path.write_text(policy + "\n", encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.strip(), "no error printed"
    assert "hunter2" not in result.stderr + result.stdout


def test_a_store_url_with_a_bad_port_is_a_config_error(tmp_path: Path) -> None:
    url = "redis://user:hunter2@127.0.0.1:notaport/0"
    path = tmp_path / "policy.yaml"
    path.write_text(f"store: {{url: '{url}'}}\n", encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result
    assert "store.url" in result.stderr, result.stderr
    listen, admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
    result = run_cli(
        "run",
        "-c",
        str(path),
        "--upstream",
        f"http://{HOST}:1",
        "--listen",
        listen,
        "--admin",
        admin,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert "hunter2" not in result.stderr
