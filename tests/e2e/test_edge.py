"""The HTTP edge (SPEC section 5, "The HTTP edge", and the key header rules of section 4).

Raw sockets on both sides where the bytes matter: a client that waits for ``100 Continue``, one
that goes away mid-body, two key field lines, a body naming its key twice. Every case runs
through a real proxy to a real upstream that records what it received.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import HOST, ProxyFactory, RunningProxy, Upstream, proxy_in_front_of

BOUND = 10.0  # seconds: every exchange in this file is bounded by this

KEYED = """
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
    max_request_body: 1KiB
  - match: {methods: [POST], path: /optional}
  - match: {methods: [POST], path: /by-body}
    key: {from: body, pointer: /client_id, required: true}
  - match: {methods: [POST], path: /off}
    idempotency: off
  - match: {methods: [POST, PUT], path: "/articles/{id}"}
    require_if_match: true
"""


async def open_raw(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.server.address
    return await asyncio.open_connection(host, port)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)


def content_length(head: bytes) -> int:
    """The Content-Length of a message head (a request's or an answer's)."""
    return next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One final answer framed by Content-Length: its head and its body."""
    head = await read_head(reader)
    return head, await asyncio.wait_for(reader.readexactly(content_length(head)), BOUND)


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def upload(path: str, body_length: int, *headers: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {HOST}",
        f"Content-Length: {body_length}",
        "Expect: 100-continue",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- Expect: 100-continue --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/orders", ("Idempotency-Key: e1",)),  # keyed, key in a header
        ("/by-body", ()),  # keyed, key in the body: the body must be read to find it
        ("/optional", ()),  # keyed route, optional key absent: forwarded unprotected
        ("/off", ()),  # idempotency: off
        ("/unmatched", ()),  # no route
    ],
)
async def test_a_client_that_waits_for_100_continue_is_told_to_send(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    store_url: str,
    path: str,
    headers: tuple[str, ...],
) -> None:
    proxy = await make_proxy(KEYED, store=store_url)
    body = b'{"client_id": "c1", "pad": "' + b"x" * 200 + b'"}'
    reader, writer = await open_raw(proxy)
    try:
        writer.write(upload(path, len(body), *headers))
        # The client sends nothing more until it is told to: a proxy that does not answer the
        # expectation leaves this read waiting.
        interim = await read_head(reader)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head, _ = await read_answer(reader)
        assert status_of(head) == 201
    finally:
        writer.close()
    assert upstream.count() == 1
    call = upstream.calls[0]
    assert call.body == body
    assert "Expect" not in call.headers  # the proxy answered it: the upstream never sees it


@pytest.mark.parametrize(
    ("method", "path", "length", "headers", "status", "code"),
    [
        ("POST", "/orders", 10, (), 400, "idempotency_key_missing"),
        ("POST", "/orders", 10, ("Idempotency-Key: ",), 400, "idempotency_key_invalid"),
        ("POST", "/orders", 5000, ("Idempotency-Key: big",), 413, "request_too_large"),
        ("PUT", "/articles/1", 10, (), 428, "precondition_required"),
    ],
    ids=["missing-key", "invalid-key", "too-large", "no-if-match"],
)
async def test_a_refused_upload_is_answered_at_once_and_the_connection_closes(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    method: str,
    path: str,
    length: int,
    headers: tuple[str, ...],
    status: int,
    code: str,
) -> None:
    proxy = await make_proxy(KEYED)
    reader, writer = await open_raw(proxy)
    try:
        writer.write(upload(path, length, *headers).replace(b"POST", method.encode(), 1))
        head, body = await read_answer(reader)
        assert status_of(head) == status
        assert json.loads(body)["code"] == code
        assert b"\r\nconnection: close" in head.lower()
        # A client may send its body anyway (it started, or its own timer ran out): those bytes
        # are never read as a next request; nothing else comes, and the connection ends.
        writer.write(b"x" * length)
        assert await asyncio.wait_for(reader.read(), BOUND) == b""
    finally:
        writer.close()
    assert upstream.count() == 0


async def test_a_client_that_sends_its_body_without_waiting_gets_no_stray_100(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(KEYED)
    body = b"0123456789"
    reader, writer = await open_raw(proxy)
    try:
        writer.write(upload("/orders", len(body), "Idempotency-Key: e2") + body)
        head, _ = await read_answer(reader)
        # RFC 9110 10.1.1: a server may omit the 100 once the body is already here; it must not
        # send one after the final answer (it would be read as the next answer).
        assert status_of(head) in (100, 201)
        if status_of(head) == 100:
            head, _ = await read_answer(reader)
        assert status_of(head) == 201
    finally:
        writer.close()
    assert upstream.count() == 1


# --- a client that goes away mid-body --------------------------------------------------------


@pytest.mark.parametrize("path", ["/orders", "/by-body", "/off", "/unmatched"])
async def test_a_client_gone_mid_body_is_a_499_with_nothing_forwarded_and_no_traceback(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    store_url: str,
    path: str,
) -> None:
    caplog.set_level(logging.INFO, logger="idemproxy")
    proxy = await make_proxy(KEYED, store=store_url)
    for attempt in range(3):
        _, writer = await open_raw(proxy)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nIdempotency-Key: gone\r\n"
            f"Content-Length: 900\r\n\r\n".encode()
            + b'{"client_id": "gone", "pad": "'
            + b"x" * 100
        )
        await writer.drain()
        writer.transport.abort()  # a reset, mid-body
        await _wait_for_access_lines(caplog, attempt + 1)
    access = _access_lines(caplog)
    assert [line["status"] for line in access] == [499, 499, 499]
    assert not {line["outcome"] for line in access} & {"upstream_error", "store_error"}
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    if path in ("/orders", "/by-body"):
        assert upstream.count() == 0  # a keyed request is forwarded only whole
        # ...and its key was never left locked: the same key now runs.
        async with http.post(
            proxy.url + path,
            data=b'{"client_id": "gone"}',
            headers={"Idempotency-Key": "gone"},
        ) as response:
            assert response.status == 201
    metrics = await _metrics(http, proxy)
    assert 'outcome="upstream_error"' not in metrics
    assert 'outcome="store_error"' not in metrics


@pytest.mark.parametrize("path", ["/orders", "/off", "/unmatched"])
async def test_a_client_gone_while_the_upstream_works_is_logged_as_499(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    store_url: str,
    path: str,
) -> None:
    """README (Logs): a request whose client went away before its answer is logged with status
    499. A client that sent its whole request and left while the upstream worked was logged
    with the upstream's 201, as if it had been answered (found by the workers audit: raw
    sockets closed mid-wait through ``run --workers 2``). A keyed one still ran and was stored,
    so its retry is the replay."""
    caplog.set_level(logging.INFO, logger="idemproxy")
    proxy = await make_proxy(KEYED, store=store_url)
    _, writer = await open_raw(proxy)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nIdempotency-Key: left\r\n"
        "X-Test-Delay: 2\r\nContent-Length: 2\r\n\r\n{}".encode()
    )
    await writer.drain()
    for _ in range(int(BOUND / 0.02)):
        if upstream.count() == 1:
            break
        await asyncio.sleep(0.02)
    assert upstream.count() == 1
    writer.transport.abort()  # gone while the upstream works (it answers 2 s later)
    await _wait_for_access_lines(caplog, 1)
    (line,) = _access_lines(caplog)
    assert line["status"] == 499
    assert line["outcome"] == ("new" if path == "/orders" else "passthrough")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    if path == "/orders":
        async with http.post(
            proxy.url + path, data=b"{}", headers={"Idempotency-Key": "left"}
        ) as response:
            assert response.status == 201
            assert response.headers["Idempotent-Replayed"] == "true"
        assert upstream.count() == 1


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "idemproxy.access"]  # type: ignore[attr-defined]


async def _wait_for_access_lines(caplog: pytest.LogCaptureFixture, count: int) -> None:
    for _ in range(int(BOUND / 0.02)):
        if len(_access_lines(caplog)) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} access lines: {_access_lines(caplog)}")


async def _metrics(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(proxy.admin_url + "/metrics") as response:
        return await response.text()


# --- a pass-through body streams up as it arrives ---------------------------------------------


async def test_a_pass_through_body_still_arriving_is_forwarded_before_it_ends() -> None:
    """SPEC 5: no whole-body buffering. The upstream gets the head and the first half of a
    Content-Length body while the client still holds the second half back."""
    first_half_seen = asyncio.Event()
    received: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = content_length(await reader.readuntil(b"\r\n\r\n"))
        received.append(await reader.readexactly(length // 2))
        first_half_seen.set()
        received.append(await reader.readexactly(length - length // 2))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    body = b"a" * 3000 + b"b" * 3000
    async with proxy_in_front_of(upstream, KEYED) as proxy:
        reader, writer = await open_raw(proxy)
        head = f"POST /off HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body[:3000])
        await asyncio.wait_for(first_half_seen.wait(), BOUND)
        writer.write(body[3000:])
        answer, payload = await read_answer(reader)
        writer.close()
    assert (status_of(answer), payload) == (201, b"ok")
    assert b"".join(received) == body


async def test_a_chunked_pass_through_body_reaches_the_upstream_chunked_and_whole(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """Chunks of every size, split across segments anyhow (a chunk's size line in one, its data
    in the next), reach the upstream as one intact chunked body."""
    proxy = await make_proxy(KEYED)
    pieces = [b"a", b"b" * 7, b"c" * 300, b"d" * 70_000, b"e" * 2]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    head = f"POST /off HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader, writer = await open_raw(proxy)
    try:
        writer.write(head.encode() + chunked[:5])
        for start in range(5, len(chunked), 4_099):
            await writer.drain()
            writer.write(chunked[start : start + 4_099])
        answer, _ = await read_answer(reader)
    finally:
        writer.close()
    assert status_of(answer) == 201
    (call,) = upstream.calls
    assert call.body == b"".join(pieces)
    assert call.headers.get("Transfer-Encoding") == "chunked"


async def test_an_upstream_answering_before_it_reads_a_streaming_body_is_relayed() -> None:
    """An upstream may answer as soon as it has the head (the pass-put bench's upstream does).
    The client gets that answer while it still sends, and its next requests on the same
    connection are answered too. The proxy stops sending a body the upstream has answered: the
    upstream gets a part of it, and that connection is not used again."""
    received: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        try:
            received.append(await reader.readexactly(content_length(head)))
        except asyncio.IncompleteReadError as cut:
            received.append(cut.partial)
        finally:
            writer.close()

    body = bytes(range(256)) * 1024
    answers = []
    async with proxy_in_front_of(upstream, KEYED) as proxy:
        reader, writer = await open_raw(proxy)
        for _ in range(2):
            head = f"PUT /unmatched HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body[:1000])
            answers.append(await read_answer(reader))  # while the rest is still to be sent
            writer.write(body[1000:])
        # The last request comes whole: the one before it was read to its end first.
        writer.write(
            f"PUT /unmatched HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n\r\nlast".encode()
        )
        answers.append(await read_answer(reader))
        writer.close()
        for _ in range(int(BOUND / 0.02)):
            if len(received) == 3:
                break
            await asyncio.sleep(0.02)
    assert [(status_of(head), payload) for head, payload in answers] == [(201, b"ok")] * 3
    *parts, last = received  # one upstream connection per request
    assert len(parts) == 2
    assert all(len(part) >= 1000 and body.startswith(part) for part in parts)
    assert last == b"last"


# --- one key, read one way -------------------------------------------------------------------


async def test_two_key_field_lines_are_refused_even_when_they_agree(
    make_proxy: ProxyFactory, upstream: Upstream, store_url: str
) -> None:
    proxy = await make_proxy(KEYED, store=store_url)
    for lines in (("k1", "k2"), ("k1", "k1"), ("k1", "K1")):
        reader, writer = await open_raw(proxy)
        try:
            writer.write(
                f"POST /orders HTTP/1.1\r\nHost: {HOST}\r\n"
                f"Idempotency-Key: {lines[0]}\r\nidempotency-key: {lines[1]}\r\n"
                "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode()
            )
            head, body = await read_answer(reader)
        finally:
            writer.close()
        assert status_of(head) == 400
        assert json.loads(body)["code"] == "idempotency_key_invalid"
    assert upstream.count() == 0


async def test_a_body_naming_its_key_twice_with_different_values_is_refused(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(KEYED)
    async with http.post(
        proxy.url + "/by-body", data=b'{"client_id": "a", "client_id": "b"}'
    ) as response:
        assert response.status == 400
        assert (await response.json())["code"] == "idempotency_key_invalid"
    async with http.post(
        proxy.url + "/by-body", data=b'{"client_id": "a", "client_id": "a"}'
    ) as response:
        assert response.status == 201
    assert upstream.count() == 1


async def test_require_if_match_concerns_writes_not_a_post_that_creates(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(KEYED)
    async with http.post(proxy.url + "/articles/1", data=b"{}") as response:
        assert response.status == 201
    async with http.put(proxy.url + "/articles/1", data=b"{}") as response:
        assert response.status == 428
    assert upstream.count() == 1


# --- upstream answers relayed the same way on every path -------------------------------------

ROUTES = """
routes:
  - match: {methods: [POST], path: "/keyed/{name}"}
    key: {required: true}
"""


def _answer(head_lines: list[bytes], body: bytes = b"ok", status: bytes = b"200 OK") -> bytes:
    head = [b"HTTP/1.1 " + status, *head_lines, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


ANSWERS: dict[str, bytes] = {
    "big-field": _answer([b"X-Big: " + b"b" * 9000]),
    "256-fields": _answer([b"X-F%03d: v" % i for i in range(255)]),
    "257-fields": _answer([b"X-F%03d: v" % i for i in range(256)]),
    "head-near-64k": _answer([b"X-Big-%d: " % i + b"b" * 15000 for i in range(4)]),
    "head-over-64k": _answer([b"X-Big-%d: " % i + b"b" * 17000 for i in range(4)]),
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "reason": _answer([b"Idempotent-Replayed: false"], b"made", b"201 CREATED"),
    # Bytes over 0x7F: a UTF-8 cookie value, a latin-1 (obs-text) one, and in the reason phrase.
    "non-ascii": _answer(
        [b"Set-Cookie: name=Jos\xc3\xa9", b"X-Legacy: caf\xe9 \xff"], b"ok", b"201 Cr\xe9\xe9"
    ),
    "length-twice": _answer([b"Content-Length: 2"]),
    # stored on a keyed route, then every answer and replay was a closed connection
    "control-byte": _answer([b"X-Bad: a\x01b"]),
    # gzip still applied after the chunks are undone: relayed, the client got gzip bytes as its
    # body with nothing saying so (noted by the section 5 audit)
    "gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(gzip.compress(b"ok")), gzip.compress(b"ok")),
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
}


async def _serve_named_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request with ``ANSWERS[<last path segment>]``, reading its body first."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next(
                (
                    int(v)
                    for n, _, v in (ln.partition(b":") for ln in lines)
                    if n.lower() == b"content-length"
                ),
                0,
            )
            if any(ln.lower() == b"transfer-encoding: chunked" for ln in lines):
                while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.readexactly(length)
            name = lines[0].split(b" ")[1].split(b"?")[0].rsplit(b"/", 1)[-1].decode()
            writer.write(ANSWERS[name])
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def raw_proxy() -> AsyncIterator[RunningProxy]:
    async with proxy_in_front_of(_serve_named_answer, ROUTES) as proxy:
        yield proxy


@pytest.fixture
async def big_heads_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that reads heads as large as the proxy relays (aiohttp's own limits are lower)."""
    async with aiohttp.ClientSession(
        auto_decompress=False, max_line_size=1 << 17, max_field_size=1 << 17, max_headers=1024
    ) as session:
        yield session


async def _streamed_body() -> AsyncIterator[bytes]:
    """A request body still arriving when the request is forwarded (aiohttp's client path)."""
    for _ in range(3):
        yield b"chunk"


PATHS = {
    "get": ("GET", "/pass/{name}", None, {}),
    "streamed-post": ("POST", "/pass/{name}", "stream", {}),
    "whole-post": ("POST", "/pass/{name}", b"x", {}),  # arrived with its head: the lean client
    "keyed": ("POST", "/keyed/{name}", b"x", {"Idempotency-Key": "{name}"}),
}


async def _through(
    http: aiohttp.ClientSession, proxy: RunningProxy, path: str, name: str
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    method, target, body, headers = PATHS[path]
    data: Any = _streamed_body() if body == "stream" else body
    async with http.request(
        method,
        proxy.url + target.replace("{name}", name),
        data=data,
        headers={k: v.replace("{name}", name) for k, v in headers.items()},
    ) as response:
        return (
            response.status,
            response.reason or "",
            list(response.headers.items()),
            await response.read(),
        )


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["big-field", "256-fields", "head-near-64k"])
async def test_large_upstream_heads_are_relayed_on_every_path(
    raw_proxy: RunningProxy, big_heads_http: aiohttp.ClientSession, path: str, name: str
) -> None:
    status, _, headers, body = await _through(big_heads_http, raw_proxy, path, name)
    assert (status, body) == (200, b"ok")
    sent = [line.split(b": ", 1) for line in ANSWERS[name].split(b"\r\n")[1:-3]]
    relayed = [(n.encode(), v.encode()) for n, v in headers if n.lower().startswith("x-")]
    assert relayed == [(n, v) for n, v in sent if n.lower().startswith(b"x-")]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "name", ["257-fields", "head-over-64k", "length-and-chunked", "gzip-chunked", "control-byte"]
)
async def test_an_answer_no_path_can_frame_is_a_502_on_every_path_and_says_why(
    raw_proxy: RunningProxy,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    path: str,
    name: str,
) -> None:
    caplog.set_level(logging.INFO, logger="idemproxy")
    status, _, headers, body = await _through(http, raw_proxy, path, name)
    assert status == 502
    assert json.loads(body)["code"] == "upstream_unavailable"
    assert ("Content-Length", "20") not in headers
    failures = [r for r in caplog.records if r.getMessage() == "upstream failure"]
    assert len(failures) == 1
    assert failures[0].fields["error"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", list(PATHS))
async def test_an_answer_repeating_its_content_length_is_relayed_with_one_or_refused(
    raw_proxy: RunningProxy, http: aiohttp.ClientSession, path: str
) -> None:
    """RFC 9110 8.6: the same Content-Length twice is read as one, or refused. Relayed as it
    came, the client's parser refuses it (aiohttp's and Node's do): found by hand, the lean path
    passed both lines on while aiohttp's path answered 502."""
    status, _, headers, body = await _through(http, raw_proxy, path, "length-twice")
    if status == 502:
        assert json.loads(body)["code"] == "upstream_unavailable"
        return
    assert (status, body) == (200, b"ok")
    assert [v for n, v in headers if n.lower() == "content-length"] == ["2"]


async def test_an_http10_keep_alive_client_gets_an_unsized_answer_ended_by_the_close(
    raw_proxy: RunningProxy,
) -> None:
    """HTTP/1.0 has no chunking: an answer the upstream sent chunked goes to an HTTP/1.0 client
    without a length, so only the close can end it (RFC 9112 6.3). Found by hand: the proxy
    kept such a keep-alive connection open, and the next answer ran on as this body."""
    reader, writer = await open_raw(raw_proxy)
    try:
        writer.write(
            f"GET /pass/chunked HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n"
            f"GET /pass/reason HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode()
        )
        received = await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    assert b"content-length" not in head.lower()
    assert b"keep-alive" not in head.lower()
    assert body == b"ok"


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_502_says_why_in_the_log_and_leaks_nothing_to_the_client(
    raw_proxy: RunningProxy,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """aiohttp's parser errors quote the URL (query included) and the offending bytes."""
    caplog.set_level(logging.INFO, logger="idemproxy")
    status, _, _, body = await _through(http, raw_proxy, path, "257-fields?token=s3cr3t")
    assert status == 502
    assert json.loads(body)["detail"] == "the upstream's answer was malformed or broke off"
    upstream_port = str(raw_proxy.server.config.upstream.url.rsplit(":", 1)[1])
    assert upstream_port.encode() not in body
    assert b"s3cr3t" not in body
    logged = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    assert "s3cr3t" not in logged


async def test_reason_phrase_is_kept_and_the_upstreams_replayed_header_is_not_doubled(
    raw_proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    first = await _through(http, raw_proxy, "keyed", "reason")
    replay = await _through(http, raw_proxy, "keyed", "reason")
    passed = await _through(http, raw_proxy, "get", "reason")
    assert first[:2] == replay[:2] == passed[:2] == (201, "CREATED")
    assert first[3] == replay[3] == b"made"
    # The first answer is the upstream's as it came; the replay carries one marker, ours.
    assert [v for n, v in first[2] if n == "Idempotent-Replayed"] == ["false"]
    assert [v for n, v in replay[2] if n == "Idempotent-Replayed"] == ["true"]


@pytest.mark.parametrize("path", list(PATHS))
async def test_header_bytes_over_0x7f_are_relayed_and_replayed_as_they_came(
    raw_proxy: RunningProxy, http: aiohttp.ClientSession, path: str
) -> None:
    # They went out re-encoded as UTF-8 (caf\xe9 as caf\xc3\xa9, a UTF-8 cookie encoded twice):
    # not "unchanged", and a replay not byte for byte.
    method, target, body, headers = PATHS[path]
    sent_head = ANSWERS["non-ascii"].split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    for attempt in range(2 if path == "keyed" else 1):
        async with http.request(
            method,
            raw_proxy.url + target.replace("{name}", "non-ascii"),
            data=body,
            headers={k: v.replace("{name}", "non-ascii") for k, v in headers.items()},
        ) as response:
            assert await response.read() == b"ok"
            relayed = [n + b": " + v for n, v in response.raw_headers]
            assert response.status == 201
            assert (response.reason or "").encode("utf-8", "surrogateescape") == b"Cr\xe9\xe9"
            replayed = response.headers.get("Idempotent-Replayed")
        assert replayed == ("true" if attempt else None)
        assert [line for line in relayed if line.lower().startswith((b"set-", b"x-"))] == [
            line for line in sent_head if line.lower().startswith((b"set-", b"x-"))
        ]


# Bytes over 0x7F in a request head: a UTF-8 value and a latin-1 (obs-text) one.
_OBS_TEXT_LINES = [b"X-Utf8: Jos\xc3\xa9", b"X-Legacy: caf\xe9 \xff"]
_REQUESTS_WITH_OBS_TEXT = {
    # (the head without the lines under test, the body with it, the body parts sent later)
    "streamed-chunked": (
        b"POST /pass/x HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"",
        [b"2\r\nab\r\n", b"0\r\n\r\n"],
    ),
    "streamed-length": (b"POST /pass/x HTTP/1.1\r\nContent-Length: 4", b"ab", [b"cd"]),
    "whole-post": (b"POST /pass/x HTTP/1.1\r\nContent-Length: 2", b"ab", []),
    "keyed": (b"POST /keyed/x HTTP/1.1\r\nIdempotency-Key: k\r\nContent-Length: 2", b"ab", []),
    "get": (b"GET /pass/x HTTP/1.1", b"", []),
}


@pytest.mark.parametrize("shape", list(_REQUESTS_WITH_OBS_TEXT))
async def test_request_header_bytes_over_0x7f_reach_the_upstream_as_they_came(shape: str) -> None:
    """RFC 9110 5.5 obs-text is forwarded as is. A body still arriving goes through aiohttp's
    client, which wrote header text as UTF-8 and dropped what did not encode: the upstream got
    `X-Legacy: caf` (found by the section 4 audit)."""
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    head, first, later = _REQUESTS_WITH_OBS_TEXT[shape]
    async with proxy_in_front_of(upstream, ROUTES) as proxy:
        reader, writer = await open_raw(proxy)
        try:
            writer.write(b"\r\n".join([head, b"Host: x", *_OBS_TEXT_LINES]) + b"\r\n\r\n" + first)
            for part in later:  # after the request was forwarded: aiohttp's client streams it
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(part)
            answer, body = await read_answer(reader)
        finally:
            writer.close()
    assert (status_of(answer), body) == (200, b"ok")
    (received,) = heads
    assert [
        line
        for line in received.split(b"\r\n")
        if line.startswith(b"X-U") or line.startswith(b"X-L")
    ] == _OBS_TEXT_LINES


# --- requests the HTTP parser refuses --------------------------------------------------------

SECRET = "Bearer s3cr3t-t0ken"
REFUSED = {
    "control-byte": b"POST /orders HTTP/1.1\r\nHost: x\r\nAuthorization: "
    + SECRET.encode()
    + b"\x01\r\nContent-Length: 0\r\n\r\n",
    "length-and-chunked": b"POST /orders HTTP/1.1\r\nHost: x\r\nCookie: sid=s3cr3t-t0ken\r\n"
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-lengths": b"POST /orders HTTP/1.1\r\nHost: x\r\nAuthorization: "
    + SECRET.encode()
    + b"\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    "signed-length": b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n"
    b"Cookie: s3cr3t-t0ken\r\n\r\nabc",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "lowercase-method": b"post /orders HTTP/1.1\r\nHost: x\r\nCookie: s3cr3t-t0ken\r\n\r\n",
    "long-header": b"GET / HTTP/1.1\r\nHost: x\r\nCookie: s3cr3t-t0ken" + b"c" * 9000 + b"\r\n\r\n",
    # limits.max_headers (100): was 400 malformed_request "not valid HTTP/1.1"
    "many-headers": b"GET / HTTP/1.1\r\nHost: x\r\nCookie: s3cr3t-t0ken\r\n"
    + b"".join(b"X-F%03d: v\r\n" % i for i in range(120))
    + b"\r\n",
    # aiohttp's parser takes these; they were forwarded (found by the hostile-input audit):
    # the gzip coding dropped on the way, an HTTP/1.0 body read as chunked
    "gzip-then-chunked": b"POST /off HTTP/1.1\r\nHost: x\r\nCookie: s3cr3t-t0ken\r\n"
    b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "identity-then-chunked": b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: te-1\r\n"
    b"Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunked-http10": b"POST /off HTTP/1.0\r\nHost: x\r\nCookie: s3cr3t-t0ken\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    # also taken by the parser, forwarded, and answered with "HTTP/2.0 201" (or 0.9)
    "http-2.0-request-line": b"POST /off HTTP/2.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "http-0.9-request-line": b"GET / HTTP/0.9\r\nHost: x\r\nCookie: s3cr3t-t0ken\r\n\r\n",
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_a_request_the_parser_refuses_gets_a_problem_that_echoes_nothing(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    caplog.set_level(logging.INFO, logger="idemproxy")
    proxy = await make_proxy(KEYED)
    reader, writer = await open_raw(proxy)
    try:
        writer.write(REFUSED[name])
        head, body = await read_answer(reader)
    finally:
        writer.close()
    problem = json.loads(body)
    expected = (
        (431, "request_head_too_large")
        if name in ("long-header", "many-headers")
        else (400, "malformed_request")
    )
    assert (status_of(head), problem["code"]) == expected
    assert head.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))
    assert b"application/problem+json" in head
    assert b"s3cr3t" not in head + body
    assert upstream.count() == 0
    await _wait_for_access_lines(caplog, 1)
    [line] = _access_lines(caplog)
    assert (line["status"], line["outcome"]) == (expected[0], "bad_request")
    logged = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    assert "s3cr3t" not in logged
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("path", ["/orders", "/by-body", "/off", "/unmatched"])
async def test_a_body_the_parser_refuses_after_its_head_gets_a_problem_at_once(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """A malformed chunk that arrives after the head was parsed (the handler already reads the
    body): aiohttp's parser refuses it, and the client gets the 400 at once, not silence until
    it gives up (found by hand: the answer never came, and the access line said 499)."""
    caplog.set_level(logging.INFO, logger="idemproxy")
    proxy = await make_proxy(KEYED)
    reader, writer = await open_raw(proxy)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nIdempotency-Key: bad-chunk\r\n"
            "Authorization: Bearer s3cr3t\r\nTransfer-Encoding: chunked\r\n\r\n"
            '11\r\n{"client_id": "c"\r\n'.encode()  # a well-framed first chunk
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the head is parsed and handled before the bad chunk comes
        writer.write(b"zz\r\n}\r\n0\r\n\r\n")
        head, body = await read_answer(reader)
        assert await asyncio.wait_for(reader.read(), BOUND) == b""  # and the connection ends
    finally:
        writer.close()
    problem = json.loads(body)
    assert (status_of(head), problem["code"]) == (400, "malformed_request")
    assert b"application/problem+json" in head
    assert b"\r\nconnection: close" in head.lower()
    assert b"s3cr3t" not in head + body
    assert upstream.count() == 0
    await _wait_for_access_lines(caplog, 1)
    [line] = _access_lines(caplog)
    assert (line["status"], line["outcome"]) == (400, "bad_request")
    assert not [r for r in caplog.records if r.exc_info]


# --- counted for the dashboard and the alerts ------------------------------------------------


async def test_a_lease_lost_while_its_request_ran_is_counted(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """An operator purges the key while its request runs: the completion finds the lease gone,
    the client still gets its answer, and idemproxy_leases_lost_total counts it."""
    proxy = await make_proxy(KEYED + "admin: {token: lease-test-token}\n")
    headers = {"Idempotency-Key": "lost", "X-Test-Delay": "1"}
    answer = asyncio.ensure_future(http.post(proxy.url + "/orders", data=b"{}", headers=headers))
    for _ in range(int(BOUND / 0.02)):
        if upstream.count():
            break
        await asyncio.sleep(0.02)
    assert upstream.count() == 1, "the request never reached the upstream"
    purge = {"Authorization": "Bearer lease-test-token"}
    async with http.delete(proxy.admin_url + "/keys/lost", headers=purge) as response:
        assert response.status == 204
    async with await asyncio.wait_for(answer, BOUND) as response:
        assert response.status == 201
    metrics = await _metrics(http, proxy)
    assert "idemproxy_leases_lost_total 1.0" in metrics.splitlines()
    assert "idemproxy_fail_open_total 0.0" in metrics.splitlines()
