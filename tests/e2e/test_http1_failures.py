"""The lean HTTP/1.1 client of keyed exchanges (``idemproxy.http1``): malformed answers,
timeouts, answers too large to store, clients leaving, the pool used directly, and uvloop
(harness: http1_harness)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import uvloop

from idemproxy.errors import UpstreamFailure
from idemproxy.http1 import Http1Pool
from tests.conftest import HOST, free_port
from tests.http1_harness import (
    BIG,
    BOUND,
    FRAMINGS,
    Answerer,
    Conn,
    RawUpstream,
    Seen,
    answer_ok,
    assert_problem,
    assert_replay_of,
    assert_retry_settled,
    build,
    keyed_body,
    policy,
    post,
    response,
    running,
    uid,
    until,
)

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
