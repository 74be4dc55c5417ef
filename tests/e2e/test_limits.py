"""Limits: what one client can make the proxy hold (``limits:`` in the policy file)."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from idemproxy.config import ConfigError, load_text
from idemproxy.errors import StoreUnavailable
from idemproxy.records import StoredResponse
from idemproxy.store.memory import MemoryStore
from tests.conftest import ProxyFactory, RunningProxy, Upstream

RESPONSE = StoredResponse(201, [], b"ok")


async def test_memory_store_at_its_bound_evicts_the_completed_record_expiring_first() -> None:
    store = MemoryStore(max_keys=3)
    for key, ttl in (("a", 60.0), ("b", 30.0), ("c", 90.0)):
        assert await store.acquire(key, "fp", "t", 5.0) is None
        assert await store.complete(key, "t", RESPONSE, ttl)
    assert await store.acquire("d", "fp", "t", 5.0) is None
    assert len(store) == 3
    assert await store.get("b") is None  # the one closest to expiry went
    assert await store.get("a") is not None
    assert await store.get("c") is not None


async def test_memory_store_never_evicts_an_in_flight_lease() -> None:
    store = MemoryStore(max_keys=2)
    assert await store.acquire("lease", "fp", "t", 60.0) is None
    assert await store.acquire("done", "fp", "t", 60.0) is None
    assert await store.complete("done", "t", RESPONSE, 1.0)
    assert await store.acquire("new", "fp", "t", 60.0) is None  # evicts "done", not "lease"
    assert (await store.get("lease")) is not None
    with pytest.raises(StoreUnavailable):
        await store.acquire("one-too-many", "fp", "t", 60.0)  # only leases left
    assert (await store.get("lease")) is not None
    assert (await store.get("new")) is not None


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text("limits:\n  max_headers: 0\n  max_request_line: 100\n  bogus: 1\n")
    assert sorted(p.path for p in caught.value.problems) == [
        "limits.bogus",
        "limits.max_headers",
        "limits.max_request_line",
    ]
    limits = load_text("limits: {body_timeout: 2s, max_in_flight: 7}\n").limits
    assert limits.body_timeout == 2.0
    assert limits.max_in_flight == 7
    assert limits.max_headers == 100  # the documented default


async def test_keyed_requests_beyond_max_in_flight_get_503(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy("limits: {max_in_flight: 2}\n")

    async def slow(key: str) -> tuple[int, dict[str, str], bytes]:
        headers = {"Idempotency-Key": key, "X-Test-Delay": "0.5"}
        async with http.post(proxy.url + "/orders", data=b"x", headers=headers) as response:
            return response.status, dict(response.headers), await response.read()

    first = [asyncio.create_task(slow(f"k{i}")) for i in range(2)]
    for _ in range(100):
        if upstream.count() == 2:
            break
        await asyncio.sleep(0.02)
    status, headers, body = await slow("k-third")
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert b'"proxy_overloaded"' in body
    assert [(await task)[0] for task in first] == [201, 201]
    async with http.get(proxy.url + "/passthrough") as response:
        assert response.status == 201  # pass-through is not counted


def raw_exchange(proxy: RunningProxy, request: bytes) -> bytes:
    """Send raw bytes; return the answer's head (and what came with it)."""
    host, port = proxy.server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


async def test_a_body_slower_than_body_timeout_gets_408(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy("limits: {body_timeout: 300ms}\n")
    request = (
        b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow-body\r\n"
        b"Content-Length: 100\r\n\r\n0123456789"
    )
    answer = await asyncio.to_thread(raw_exchange, proxy, request)
    assert answer.startswith(b"HTTP/1.1 408")
    assert upstream.count() == 0


async def test_too_many_headers_and_too_long_lines_are_refused(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy("limits: {max_headers: 10, max_request_line: 2KiB}\n")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(20))
    answer = await asyncio.to_thread(
        raw_exchange, proxy, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"
    )
    assert answer[9:10] == b"4"  # a 4xx status
    long_line = b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await asyncio.to_thread(raw_exchange, proxy, long_line)
    assert answer[9:10] == b"4"
    assert upstream.count() == 0


async def test_an_idle_keep_alive_connection_is_closed(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy("limits: {idle_timeout: 300ms}\n")
    host, port = proxy.server.address

    def idle() -> bytes:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while True:  # the whole answer, then silence until the proxy closes
                chunk = sock.recv(65536)
                if not chunk:
                    return received
                received += chunk

    received = await asyncio.to_thread(idle)
    assert received.startswith(b"HTTP/1.1 201")
    assert upstream.count() == 1
