"""The lean HTTP/1.1 client of keyed exchanges (``idemproxy.http1``): framings replayed byte for
byte, what the upstream receives, keep-alive and the pool bound (harness: http1_harness)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from tests.conftest import HOST
from tests.http1_harness import (
    BOUND,
    DATE,
    FRAMINGS,
    Conn,
    Framing,
    Seen,
    answer_ok,
    assert_problem,
    assert_replay_of,
    keyed_body,
    policy,
    post,
    response,
    running,
    send_raw,
    uid,
    until,
)

# --- 1. response framings, replayed byte for byte ---------------------------------------------


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
