"""Pass-through (SPEC section 5): everything that is not a keyed request goes through untouched.

Safe methods, unmatched routes, ``idempotency: off`` routes and keyless requests on optional-key
routes are forwarded streaming both ways, with hop-by-hop headers removed, X-Forwarded-* added,
the original Host kept, raw paths and queries as sent, bodies byte for byte (never decompressed),
and WebSocket upgrades relayed. Nothing here is mocked: every upstream is a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from tests.conftest import HOST, ProxyFactory, RunningProxy, Upstream, free_port

BOUND = 10.0  # seconds: the upper bound of every wait in this file (never an assertion)

HOP_BY_HOP_REQUEST = (
    "Connection",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Upgrade",
    "Proxy-Authorization",
    "Proxy-Connection",
    "X-Secret-Hop",  # named in Connection, so hop-by-hop for this one request
    "HTTP2-Settings",  # named in Connection by an h2c upgrade attempt
)


# --- helpers: upstreams and proxies of a test's own --------------------------------------------


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    """Everything a test starts is stopped here, in reverse order (proxies before upstreams)."""
    async with contextlib.AsyncExitStack() as exit_stack:
        yield exit_stack


async def start_upstream(
    stack: contextlib.AsyncExitStack, app: web.Application, **server_kwargs: Any
) -> str:
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server(**server_kwargs)
    stack.push_async_callback(server.close)
    return f"http://{HOST}:{server.port}"


async def start_proxy(
    stack: contextlib.AsyncExitStack, upstream_url: str, policy: str = ""
) -> RunningProxy:
    config = load_text(
        policy,
        flags=Overrides(upstream=upstream_url, listen=f"{HOST}:0", admin=f"{HOST}:0"),
    )
    server = ProxyServer(config)
    await server.start()
    stack.push_async_callback(server.stop)
    return RunningProxy(server)


def single_route_app(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def header_names(headers: dict[str, str]) -> set[str]:
    return {name.lower() for name in headers}


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as bytes on a fresh connection and read until the peer closes it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), BOUND)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()
        await writer.wait_closed()


# --- what passes through -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_safe_methods_pass_through_even_with_a_key(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, method: str
) -> None:
    proxy = await make_proxy()  # the default policy: POST and PATCH keyed on every path
    headers = {"Idempotency-Key": "safe-1"}
    serials = []
    for _ in range(2):
        async with http.request(method, proxy.url + "/orders/7", headers=headers) as response:
            body = await response.read()
            assert response.status == 201
            assert "Idempotent-Replayed" not in response.headers
            serials.append(response.headers["X-Serial"])
            assert body == (b"" if method == "HEAD" else b'{"serial": %s}' % serials[-1].encode())
    assert upstream.count("/orders/7") == 2
    assert [c.method for c in upstream.calls] == [method, method]
    assert serials == ["1", "2"]


async def test_unmatched_routes_pass_through_while_matched_ones_are_keyed(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy("routes:\n  - match: {methods: [POST], path: /orders}\n")
    headers = {"Idempotency-Key": "unmatched-1"}
    for path in ("/refunds", "/refunds"):
        async with http.post(proxy.url + path, data=b"r", headers=headers) as response:
            assert response.status == 201
            assert "Idempotent-Replayed" not in response.headers
    # PUT on the keyed path is not matched either: its methods are [POST].
    for _ in range(2):
        async with http.put(proxy.url + "/orders", data=b"p", headers=headers) as response:
            assert response.status == 201
            assert "Idempotent-Replayed" not in response.headers
    assert upstream.count("/refunds") == 2
    assert upstream.count("/orders") == 2

    # The control: the matched route really is keyed in this very proxy.
    headers = {"Idempotency-Key": "matched-1"}
    replayed = []
    for _ in range(2):
        async with http.post(proxy.url + "/orders", data=b"o", headers=headers) as response:
            assert response.status == 201
            replayed.append(response.headers.get("Idempotent-Replayed"))
    assert replayed == [None, "true"]
    assert upstream.count("/orders") == 3


@pytest.mark.parametrize("spelling", ["off", "false"])
async def test_idempotency_off_routes_pass_through_with_a_key(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, spelling: str
) -> None:
    proxy = await make_proxy(
        f"""
routes:
  - match: {{path: "/internal/**"}}
    idempotency: {spelling}
  - match: {{methods: [POST], path: "/**"}}
"""
    )
    headers = {"Idempotency-Key": "off-1", "Content-Type": "application/json"}
    for _ in range(2):
        async with http.post(
            proxy.url + "/internal/jobs", data=b'{"a": 1}', headers=headers
        ) as response:
            assert response.status == 201
            assert "Idempotent-Replayed" not in response.headers
    assert upstream.count("/internal/jobs") == 2
    assert [c.body for c in upstream.calls] == [b'{"a": 1}', b'{"a": 1}']

    # The catch-all route after it is keyed: the same pair of requests there runs once.
    headers["Idempotency-Key"] = "off-2"
    for _ in range(2):
        async with http.post(proxy.url + "/jobs", data=b'{"a": 1}', headers=headers):
            pass
    assert upstream.count("/jobs") == 1


# --- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hop_headers",
    [
        "Connection: close, X-Secret-Hop\r\n"
        "X-Secret-Hop: for-the-proxy-only\r\n"
        "Keep-Alive: timeout=5, max=100\r\n"
        "TE: trailers, deflate\r\n"
        "Trailer: X-Checksum\r\n"
        "Upgrade: h2c\r\n"
        "Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n"
        "Proxy-Connection: keep-alive\r\n",
        # An h2c upgrade attempt: not a WebSocket, so answered as plain HTTP/1.1.
        "Connection: Upgrade, HTTP2-Settings, close\r\n"
        "Upgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    ],
    ids=["named-in-connection", "h2c-upgrade"],
)
async def test_hop_by_hop_request_headers_do_not_reach_the_upstream(
    make_proxy: ProxyFactory, upstream: Upstream, hop_headers: str
) -> None:
    proxy = await make_proxy()
    _, port = proxy.server.address
    request = (
        "GET /hops HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        f"{hop_headers}"
        "Authorization: Bearer end-to-end\r\n"
        "Cookie: a=1; b=2\r\n"
        "X-End-To-End: kept\r\n"
        "Accept: application/json\r\n"
        "\r\n"
    ).encode()
    answer = await raw_exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]

    assert upstream.count("/hops") == 1
    seen = upstream.calls[0].headers
    leaked = header_names(seen) & {name.lower() for name in HOP_BY_HOP_REQUEST}
    assert not leaked, f"hop-by-hop headers reached the upstream: {sorted(leaked)}"
    assert seen["Authorization"] == "Bearer end-to-end"
    assert seen["Cookie"] == "a=1; b=2"
    assert seen["X-End-To-End"] == "kept"
    assert seen["Accept"] == "application/json"


async def test_hop_by_hop_response_headers_are_not_sent_to_the_client(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    """A raw upstream, so the hop-by-hop headers it sends are exactly the ones written here."""
    served = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Content-Type: text/plain\r\n"
                b"Content-Length: 2\r\n"
                b"Connection: close, X-Hop-Response\r\n"
                b"X-Hop-Response: for-the-proxy-only\r\n"
                b"Keep-Alive: timeout=5\r\n"
                b"Proxy-Authenticate: Basic realm=upstream\r\n"
                b"Proxy-Connection: keep-alive\r\n"
                b"Trailer: X-Checksum\r\n"
                b"Upgrade: h2c\r\n"
                b"Set-Cookie: a=1\r\n"
                b"Set-Cookie: b=2\r\n"
                b"X-End-To-End: kept\r\n"
                b"\r\n"
                b"ok"
            )
            await writer.drain()
            served.set()
        finally:
            writer.close()

    raw = await asyncio.start_server(answer, HOST, 0)
    stack.push_async_callback(raw.wait_closed)
    stack.callback(raw.close)
    port = raw.sockets[0].getsockname()[1]
    proxy = await start_proxy(stack, f"http://{HOST}:{port}")

    async with http.get(proxy.url + "/hops") as response:
        body = await response.read()
        names = {name.decode().lower() for name, _ in response.raw_headers}
        connection = response.headers.get("Connection", "").lower()
        assert response.status == 200
        assert body == b"ok"
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert response.headers["X-End-To-End"] == "kept"
    assert served.is_set()
    leaked = names & {
        "x-hop-response",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "upgrade",
    }
    assert not leaked, f"hop-by-hop response headers reached the client: {sorted(leaked)}"
    assert "x-hop-response" not in connection


@pytest.mark.parametrize(
    ("prior", "expected"),
    [
        ([], "127.0.0.1"),
        (["203.0.113.7"], "203.0.113.7, 127.0.0.1"),
        (
            ["203.0.113.7, 10.0.0.1", "198.51.100.2"],
            "203.0.113.7, 10.0.0.1, 198.51.100.2, 127.0.0.1",
        ),
    ],
    ids=["none", "one", "two-lines"],
)
async def test_forwarded_headers_are_added_and_the_host_is_kept(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    prior: list[str],
    expected: str,
) -> None:
    proxy = await make_proxy()
    headers: CIMultiDict[str] = CIMultiDict(Host="shop.example.test:8443")
    for value in prior:
        headers.add("X-Forwarded-For", value)
    async with http.get(proxy.url + "/where", headers=headers) as response:
        assert response.status == 201
    seen = upstream.calls[0].headers
    assert seen["Host"] == "shop.example.test:8443"
    assert seen["X-Forwarded-For"] == expected
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == "shop.example.test:8443"


# --- streaming ---------------------------------------------------------------------------------


async def test_response_streams_to_the_client_before_the_upstream_finishes(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first-chunk;")
        order.append("upstream sent the first chunk")
        await asyncio.wait_for(release.wait(), BOUND)
        order.append("upstream sends the rest")
        await response.write(b"second-chunk;")
        await response.write(b"last-chunk")
        await response.write_eof()
        return response

    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(handler)))
    async with http.get(proxy.url + "/feed") as response:
        assert response.status == 200
        assert response.headers.get("Transfer-Encoding") == "chunked"
        # If the proxy buffered the whole body, this read would never finish: the upstream
        # holds the rest back until the client has seen the first chunk.
        first = await asyncio.wait_for(response.content.readexactly(12), BOUND)
        order.append("client received the first chunk")
        release.set()
        rest = await asyncio.wait_for(response.content.read(), BOUND)
    assert first == b"first-chunk;"
    assert rest == b"second-chunk;last-chunk"
    assert order == [
        "upstream sent the first chunk",
        "client received the first chunk",
        "upstream sends the rest",
    ]


STREAM_POLICY = """
routes:
  - match: {path: "/internal/**"}
    idempotency: off
  - match: {methods: [POST, PATCH], path: "/**"}
"""


BIG = 5 * 1024 * 1024


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("PUT", "/uploads/big", {}),  # unmatched
        ("POST", "/uploads/big", {}),  # keyed route, key optional and absent
        ("POST", "/internal/uploads", {"Idempotency-Key": "off-route"}),  # idempotency: off
        ("PUT", "/uploads/big", {"Content-Length": str(BIG)}),  # unmatched, not chunked
    ],
    ids=["unmatched", "keyless-optional", "idempotency-off", "unmatched-content-length"],
)
async def test_large_request_body_streams_to_the_upstream(
    stack: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    """5 MiB (over max_request_body) arrives intact, and the upstream reads it as it is sent."""
    first_chunk_read = asyncio.Event()
    order: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        first = await request.content.readany()
        digest.update(first)
        size += len(first)
        order.append("upstream read the first chunk")
        first_chunk_read.set()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "sha256": digest.hexdigest(),
                "size": size,
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
                "content_length": request.headers.get("Content-Length"),
            }
        )

    upstream_url = await start_upstream(stack, single_route_app(handler))
    proxy = await start_proxy(stack, upstream_url, STREAM_POLICY)
    payload = random.Random(5).randbytes(BIG)
    step = 64 * 1024

    async def body() -> AsyncIterator[bytes]:
        yield payload[:step]
        # Without streaming, the upstream would see nothing before the whole body was sent,
        # and this wait would time out.
        await asyncio.wait_for(first_chunk_read.wait(), BOUND)
        order.append("client sends the rest")
        for start in range(step, len(payload), step):
            yield payload[start : start + step]

    timeout = aiohttp.ClientTimeout(total=30)
    async with http.request(
        method, proxy.url + path, data=body(), headers=headers, timeout=timeout
    ) as response:
        assert response.status == 200, await response.text()
        received = await response.json()
    assert received == {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        # The framing the client chose is the framing the upstream gets.
        "transfer_encoding": None if "Content-Length" in headers else "chunked",
        "content_length": headers.get("Content-Length"),
    }
    assert order == ["upstream read the first chunk", "client sends the rest"]


async def test_keep_alive_connections_are_reused_on_both_sides(
    stack: contextlib.AsyncExitStack,
) -> None:
    peers: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(handler)))
    opened: list[object] = []

    async def on_create(*_: object) -> None:
        opened.append(object())

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as client:
        for i in range(3):
            async with client.get(f"{proxy.url}/k/{i}") as response:
                assert response.status == 200
                assert await response.read() == b"ok"
                assert "close" not in response.headers.get("Connection", "").lower()
    assert len(opened) == 1  # the client kept one connection to the proxy
    assert len(peers) == 3
    assert len(set(peers)) == 1  # and the proxy kept one connection to the upstream


# --- bytes and statuses as they are -------------------------------------------------------------


@pytest.mark.parametrize(
    "path_qs",
    [
        "/a%2Fb/c%20d?x=1&y=%2F&y=two&empty=&plus=a+b",
        "/caf%C3%A9/%7euser?q=%E2%9C%93&sort=-created_at",
        "/search?q=a%26b%3Dc&&flag&semi=1;2",
        "/files/%2E%2E%2Fetc%2Fpasswd?path=..%2F..",
    ],
)
async def test_paths_and_query_strings_are_forwarded_raw(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession, path_qs: str
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return web.Response(text="ok")

    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(handler)))
    async with http.get(URL(proxy.url + path_qs, encoded=True)) as response:
        assert response.status == 200
    assert seen == [path_qs]


STATUSES = {
    200: "OK",
    202: "Accepted",
    204: "No Content",
    304: "Not Modified",
    404: "Not Found",
    418: "I'm a teapot",
    299: "Custom Reason",  # unregistered code, reason of the upstream's own
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@pytest.mark.parametrize("status", list(STATUSES))
async def test_status_and_reason_pass_through(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession, status: int
) -> None:
    bodiless = status in (204, 304)

    async def handler(request: web.Request) -> web.StreamResponse:
        body = None if bodiless else b"status %d" % status
        return web.Response(
            status=status, reason=STATUSES[status], body=body, headers={"ETag": '"v7"'}
        )

    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(handler)))
    # A keyless POST on the default policy passes through too; 5xx are not special there.
    for method in ("GET", "POST"):
        async with http.request(method, proxy.url + "/s") as response:
            body = await response.read()
            assert response.status == status
            assert response.reason == STATUSES[status]
            assert response.headers["ETag"] == '"v7"'
            assert body == (b"" if bodiless else b"status %d" % status)
            if bodiless:
                assert "Transfer-Encoding" not in response.headers
            assert "Idempotent-Replayed" not in response.headers


async def test_status_line_without_a_reason_phrase(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 \r\nX-Sent: yes\r\nConnection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    raw = await asyncio.start_server(answer, HOST, 0)
    stack.push_async_callback(raw.wait_closed)
    stack.callback(raw.close)
    proxy = await start_proxy(stack, f"http://{HOST}:{raw.sockets[0].getsockname()[1]}")
    async with http.get(proxy.url + "/no-reason") as response:
        assert response.status == 204
        assert response.headers["X-Sent"] == "yes"
        assert await response.read() == b""


GZIPPED = gzip.compress(b"compressible text, " * 5000, mtime=0)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_gzip_response_bytes_are_not_decompressed(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession, framing: str
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "text/plain", "Content-Encoding": "gzip", "Vary": "Accept"}
        if framing == "content-length":
            return web.Response(body=GZIPPED, headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for start in range(0, len(GZIPPED), 1000):
            await response.write(GZIPPED[start : start + 1000])
        await response.write_eof()
        return response

    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(handler)))
    async with http.get(proxy.url + "/z", headers={"Accept-Encoding": "gzip"}) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        if framing == "content-length":
            assert response.headers["Content-Length"] == str(len(GZIPPED))
    assert body == GZIPPED


async def test_gzip_request_body_reaches_the_upstream_compressed(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((request.headers.get("Content-Encoding"), await request.read()))
        return web.Response(status=204)

    # The upstream itself must not decompress, so it sees exactly the bytes on the wire.
    upstream_url = await start_upstream(stack, single_route_app(handler), auto_decompress=False)
    proxy = await start_proxy(stack, upstream_url)
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    async with http.put(proxy.url + "/upload", data=GZIPPED, headers=headers) as response:
        assert response.status == 204
    assert seen == [("gzip", GZIPPED)]


# --- WebSocket ---------------------------------------------------------------------------------


class WsUpstream:
    """An upstream WebSocket endpoint: echoes, pushes on request, closes on request."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.upgrade_headers: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.upgrade_headers = dict(request.headers)
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                if message.data == "close-please":
                    await ws.close(code=4001, message=b"upstream says bye")
                    break
                await ws.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(bytes(reversed(message.data)))
        self.close_code = ws.close_code
        self.closed.set()
        return ws


async def test_websocket_is_relayed_both_ways_and_client_close_propagates(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    endpoint = WsUpstream()
    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(endpoint.handle)))
    async with http.ws_connect(
        proxy.url + "/ws?room=1",
        protocols=("chat.v1", "chat.v2"),
        timeout=aiohttp.ClientWSTimeout(ws_close=BOUND),
    ) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("hello")
        text = await ws.receive(timeout=BOUND)
        assert (text.type, text.data) == (aiohttp.WSMsgType.TEXT, "echo:hello")
        await ws.send_bytes(b"\x00\x01\x02\xff")
        binary = await ws.receive(timeout=BOUND)
        assert (binary.type, binary.data) == (aiohttp.WSMsgType.BINARY, b"\xff\x02\x01\x00")
        await ws.send_str("héllo ✓")
        text = await ws.receive(timeout=BOUND)
        assert text.data == "echo:héllo ✓"
        await ws.close(code=4002)
    await asyncio.wait_for(endpoint.closed.wait(), BOUND)
    assert endpoint.close_code == 4002
    # The upgrade reached the upstream as an upgrade, with the forwarded headers added.
    seen = {k.lower(): v for k, v in endpoint.upgrade_headers.items()}
    assert seen["upgrade"].lower() == "websocket"
    assert seen["x-forwarded-for"] == "127.0.0.1"


async def test_websocket_upstream_close_propagates_to_the_client(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    endpoint = WsUpstream()
    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(endpoint.handle)))
    async with http.ws_connect(
        proxy.url + "/ws", protocols=("chat.v2",), timeout=aiohttp.ClientWSTimeout(ws_close=BOUND)
    ) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("close-please")
        message = await ws.receive(timeout=BOUND)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert message.data == 4001
        assert ws.close_code == 4001
    # The upstream's close handshake completed too (the code it reads back is the proxy's echo).
    await asyncio.wait_for(endpoint.closed.wait(), BOUND)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_upgrade_the_upstream_refuses_gets_the_upstreams_answer(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession, framing: str
) -> None:
    """A WebSocket endpoint that wants credentials answers 401: the client gets that answer,
    status, headers and body, not a 502 that says the upstream is down (found by hand: a 403
    came back as 502 upstream_unavailable, logged as an upstream failure)."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="ws"', "X-Refused": "yes"}
        if framing == "length":
            return web.Response(status=401, text="log in first", headers=headers)
        response = web.StreamResponse(status=401, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"log in ")
        await response.write(b"first")
        return response

    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(refuse)))
    port = proxy.server.address[1]
    upgrade = (
        f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    received = await raw_exchange(
        port,
        upgrade.encode()
        + f"GET /next HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(),
    )
    upgrade_headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with http.get(f"http://{HOST}:{port}/ws", headers=upgrade_headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="ws"'
        assert response.headers["X-Refused"] == "yes"
        assert await response.read() == b"log in first"
    # The connection stays usable: the request after the refused upgrade is answered too.
    assert received.startswith(b"HTTP/1.1 401 ")
    assert received.count(b"HTTP/1.1 401 ") == 2  # the next request reached the same upstream


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_an_upgrade_asked_by_another_method_than_get_is_forwarded_as_that_method(
    stack: contextlib.AsyncExitStack, method: str
) -> None:
    """RFC 6455 4.1: a WebSocket handshake is a GET. A POST with ``Upgrade: websocket`` was
    opened upstream as a WebSocket, so the upstream got a GET without the body, and its answer
    went back as the POST's (found by the hostile-input audit, a raw upstream's log)."""
    seen: list[tuple[str, bytes, str | None]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, await request.read(), request.headers.get("Upgrade")))
        return web.Response(status=200, text="plain")

    proxy = await start_proxy(stack, await start_upstream(stack, single_route_app(record)))
    received = await raw_exchange(
        proxy.server.address[1],
        f"{method} /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 5\r\n\r\nhello".encode(),
    )
    assert received.startswith(b"HTTP/1.1 200 "), received
    assert received.endswith(b"plain")
    assert seen == [(method, b"hello", None)]  # Upgrade is hop-by-hop: not forwarded


# --- upstream down -----------------------------------------------------------------------------


async def assert_upstream_unavailable(response: aiohttp.ClientResponse) -> None:
    assert response.status == 502
    assert response.content_type == "application/problem+json"
    problem = json.loads(await response.read())
    assert problem["status"] == 502
    assert problem["code"] == "upstream_unavailable"
    assert {"type", "title", "detail"} <= set(problem)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/things", None), ("PUT", "/things/1", b"x" * 1000), ("POST", "/orders", b"{}")],
)
async def test_upstream_down_on_pass_through_is_a_502_problem(
    stack: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: bytes | None,
) -> None:
    proxy = await start_proxy(stack, f"http://{HOST}:{free_port()}")  # nothing listens there
    async with http.request(method, proxy.url + path, data=body) as response:
        await assert_upstream_unavailable(response)
    # The proxy itself stays up and answers the next request the same way.
    async with http.get(proxy.url + "/again") as response:
        await assert_upstream_unavailable(response)


async def test_websocket_to_a_down_upstream_is_a_502(
    stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(stack, f"http://{HOST}:{free_port()}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await http.ws_connect(proxy.url + "/ws", timeout=aiohttp.ClientWSTimeout(ws_close=BOUND))
    assert failed.value.status == 502
