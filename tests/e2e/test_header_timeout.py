"""``limits.header_timeout``: a request head (request line and headers) that does not arrive in
time closes the connection, with a 408 when part of a request came.

Raw sockets against a real proxy on loopback. Timings are never asserted tightly: a stalled
client only has to be let go within ``CLOSED_WITHIN`` seconds, many times the timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import aiohttp
import pytest

from idemproxy.config import ConfigError, load_text
from idemproxy.errors import PROBLEM_BASE_URI
from idemproxy.problems import PROBLEMS
from tests.conftest import ProxyFactory, RunningProxy, Upstream

HEADER_TIMEOUT = "limits: {header_timeout: 500ms, idle_timeout: 30s}\n"
CLOSED_WITHIN = 10.0


def connect(proxy: RunningProxy) -> socket.socket:
    return socket.create_connection(proxy.server.address, timeout=CLOSED_WITHIN)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes; fails if it is still open after the bound."""
    received = b""
    deadline = time.monotonic() + CLOSED_WITHIN
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed while some of our bytes were unread: also closed
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {CLOSED_WITHIN}s; received {received!r}")


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, leaving the connection open."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-body: {received!r}"
        body += chunk
    assert len(body) == length, "more than one response"
    return head + b"\r\n\r\n" + body


def request(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_header_timeout_is_validated_and_defaults_to_10s() -> None:
    assert load_text("").limits.header_timeout == 10.0
    assert load_text("limits: {header_timeout: 2s}\n").limits.header_timeout == 2.0
    with pytest.raises(ConfigError) as caught:
        load_text("limits:\n  header_timeout: 10\n")
    (problem,) = caught.value.problems
    assert (problem.path, problem.line) == ("limits.header_timeout", 2)
    with pytest.raises(ConfigError) as caught:
        load_text("limits: {header_timeout: 0s}\n")
    assert [p.path for p in caught.value.problems] == ["limits.header_timeout"]


async def test_half_a_request_line_then_silence_gets_408_and_close(
    make_proxy: ProxyFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="idemproxy")
    proxy = await make_proxy(HEADER_TIMEOUT)

    def stall() -> bytes:
        with connect(proxy) as sock:
            sock.sendall(b"POST /orders HT")
            return read_until_closed(sock)

    answer = await asyncio.to_thread(stall)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout"
    assert "Content-Type: application/problem+json" in lines
    assert "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines
    problem = json.loads(body)
    status, title = PROBLEMS["request_timeout"].status, PROBLEMS["request_timeout"].title
    assert problem["type"] == PROBLEM_BASE_URI + "request-timeout"
    assert (problem["status"], problem["title"], problem["code"]) == (
        status,
        title,
        "request_timeout",
    )
    assert "headers" in problem["detail"]
    assert upstream.count() == 0
    # Its access line, like every other answer of the proxy's (no request line came whole).
    access = [r.fields for r in caplog.records if r.name == "idemproxy.access"]  # type: ignore[attr-defined]
    assert [(a["method"], a["path"], a["status"], a["outcome"]) for a in access] == [
        ("-", "-", 408, "client_timeout")
    ]


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(HEADER_TIMEOUT)

    def silent() -> bytes:
        with connect(proxy) as sock:
            return read_until_closed(sock)

    assert await asyncio.to_thread(silent) == b""


async def test_headers_trickled_byte_by_byte_are_cut_off(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """Every byte comes well within the timeout; the whole head does not."""
    proxy = await make_proxy(HEADER_TIMEOUT)
    head = request("/trickle", "X-Padding: " + "p" * 40)

    def trickle() -> tuple[int, bytes]:
        with connect(proxy) as sock:
            sent = 0
            try:
                for byte in head:  # 0.1 s apart: about 7 s for the whole head
                    sock.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return sent, read_until_closed(sock)

    sent, answer = await asyncio.to_thread(trickle)
    assert sent < len(head), "the proxy took the whole head"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")  # a reset may eat the 408
    assert upstream.count() == 0


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "pass-through"])
async def test_a_slow_upstream_is_not_cut_off_by_the_header_timeout(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, keyed: bool
) -> None:
    proxy = await make_proxy(HEADER_TIMEOUT)
    headers = {"X-Test-Delay": "1.5"}
    if keyed:
        headers["Idempotency-Key"] = "slow-upstream"
    async with http.post(proxy.url + "/orders", data=b"{}", headers=headers) as response:
        assert response.status == 201
        assert b"serial" in await response.read()
    assert upstream.count() == 1


async def test_a_body_slower_than_the_header_timeout_is_left_to_body_timeout(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy("limits: {header_timeout: 500ms, body_timeout: 20s}\n")
    head = (
        b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow-body\r\n"
        b"Content-Length: 10\r\nConnection: close\r\n\r\n"
    )

    def slow_body() -> bytes:
        with connect(proxy) as sock:
            sock.sendall(head + b"01234")
            time.sleep(1.5)
            sock.sendall(b"56789")
            return read_until_closed(sock)

    answer = await asyncio.to_thread(slow_body)
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert upstream.calls[0].body == b"0123456789"


async def test_a_keep_alive_pause_longer_than_the_header_timeout_is_fine(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """Between requests the connection is idle (idle_timeout), not awaiting a head."""
    proxy = await make_proxy(HEADER_TIMEOUT)

    def two_requests() -> tuple[bytes, bytes]:
        with connect(proxy) as sock:
            sock.sendall(request("/first"))
            first = read_response(sock)
            time.sleep(1.5)
            sock.sendall(request("/second", "Connection: close"))
            return first, read_until_closed(sock)

    first, second = await asyncio.to_thread(two_requests)
    assert first.startswith(b"HTTP/1.1 201 ")
    assert second.startswith(b"HTTP/1.1 201 ")
    assert [call.path_qs for call in upstream.calls] == ["/first", "/second"]


async def test_a_stalled_head_behind_a_slow_request_closes_after_its_answer(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """A pipelined head that stalls while an earlier request is answered: that answer is sent
    whole, then the connection closes (a 408 cannot go first)."""
    proxy = await make_proxy(HEADER_TIMEOUT)

    def pipelined() -> bytes:
        with connect(proxy) as sock:
            sock.sendall(request("/slow", "X-Test-Delay: 1.5"))
            time.sleep(0.2)  # a segment of its own, while /slow is in progress
            sock.sendall(b"GET /stalled HT")
            return read_until_closed(sock)

    answer = await asyncio.to_thread(pipelined)
    assert answer.startswith(b"HTTP/1.1 201 ")
    assert answer.count(b"HTTP/1.1 ") == 1
    assert [call.path_qs for call in upstream.calls] == ["/slow"]
