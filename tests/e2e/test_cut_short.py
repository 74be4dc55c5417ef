"""An answer that breaks off after its status line went out: one event line, no traceback.

The upstream here is a raw TCP server that promises a long body, sends part of it and hangs up.
The client must see the answer end early (never a clean, short answer), the proxy must log it as
"answer cut short" (not as an unexpected error) and keep serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import HOST, proxy_in_front_of

PROMISED = 200_000
SENT = 50_000
POLICY = (
    "routes:\n  - match: {methods: [POST], path: /orders}\n    key: {required: true}\n"
    "    max_stored_response: 1KiB\n"
)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    await reader.readexactly(length)
    if b" /cut" in head.split(b"\r\n")[0]:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % PROMISED + b"x" * SENT)
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()


@pytest.fixture
async def proxy_url() -> AsyncIterator[str]:
    async with proxy_in_front_of(_serve, POLICY) as proxy:
        yield proxy.url


async def _read_cut(response: aiohttp.ClientResponse) -> int:
    """Bytes received before the answer broke off; fails if it ended cleanly."""
    received = 0
    try:
        async for chunk in response.content.iter_any():
            received += len(chunk)
    except aiohttp.ClientPayloadError:
        return received
    raise AssertionError(f"the answer ended cleanly after {received} bytes")


@pytest.mark.parametrize("keyed", [False, True], ids=["pass-through", "keyed-streamed"])
async def test_an_upstream_that_hangs_up_mid_answer_cuts_the_client_answer_short(
    keyed: bool,
    proxy_url: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="idemproxy")
    if keyed:
        request = http.post(proxy_url + "/cut", data=b"x", headers={"Idempotency-Key": "cut-1"})
    else:
        request = http.get(proxy_url + "/cut")
    async with request as response:
        assert response.status == 200
        assert await _read_cut(response) < PROMISED
    async with http.get(proxy_url + "/after") as response:  # still serving
        assert response.status == 200
        assert await response.read() == b"ok"
    cut = [r for r in caplog.records if r.getMessage() == "answer cut short"]
    assert len(cut) == 1
    assert cut[0].fields["side"] == "upstream"  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("idemproxy")]
    access = [r for r in caplog.records if r.name == "idemproxy.access"]
    assert [r.fields["outcome"] for r in access] == ["upstream_error", "passthrough"]  # type: ignore[attr-defined]


# --- a client that went away before a streamed answer's head -----------------------------------


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("keyed", [False, True], ids=["pass-through", "keyed"])
async def test_a_client_gone_before_its_answer_starts_is_a_499_without_traceback(
    keyed: bool, streamed: bool, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow upstream (httpbin's ``/drip?delay=2``) whose client gave up first: the answer's
    head cannot go out. Found by hand with ``curl --max-time 1``: a streamed answer's access
    line said 500 and an "unexpected error" traceback was logged, a whole one's said 200 (the
    README: a request whose client went away before its answer is logged with status 499)."""
    caplog.set_level(logging.INFO, logger="idemproxy")
    asked, release = asyncio.Event(), asyncio.Event()
    if keyed:
        request, body = b"POST /orders HTTP/1.1\r\nIdempotency-Key: late-1\r\n", b"x"
    else:
        request, body = b"GET /late HTTP/1.1\r\n", b""
    request += b"Host: %s\r\nContent-Length: %d\r\n\r\n" % (HOST.encode(), len(body))

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b" /after " not in head.split(b"\r\n")[0]:
            await reader.readexactly(len(body))
            asked.set()
            await release.wait()
            if streamed:  # chunked and over max_stored_response (1KiB): streamed on both paths
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                writer.write(b"800\r\n" + b"x" * 0x800 + b"\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with proxy_in_front_of(slow, POLICY) as proxy:
        host, port = proxy.server.address
        _, client = await asyncio.open_connection(host, port)
        client.write(request + body)
        await client.drain()
        await asyncio.wait_for(asked.wait(), 10)
        client.transport.abort()  # the client gives up while the upstream is still silent
        await asyncio.sleep(0.2)  # ordering, not timing: the proxy sees the reset first
        release.set()
        async with http.get(proxy.url + "/after") as response:  # still serving
            assert response.status == 200
        for _ in range(500):  # bounded: the access line of the request that lost its client
            access = [r.fields for r in caplog.records if r.name == "idemproxy.access"]  # type: ignore[attr-defined]
            if len(access) >= 2:
                break
            await asyncio.sleep(0.02)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    gone = [line for line in access if line["path"] != "/after"]
    # The request did run: its outcome stays what it was (metrics count executions by it).
    outcome = "new" if keyed else "passthrough"
    assert [(line["status"], line["outcome"]) for line in gone] == [(499, outcome)]
