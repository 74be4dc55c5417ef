"""End to end: the rows of the keyed request lifecycle table (SPEC section 4), on both stores.

Each test starts a real proxy (``make_proxy``) in front of the recording upstream and talks to it
over HTTP. ``store_url`` runs every test once on ``memory://`` and once on a real Redis (the
"store unreachable" rows only make sense for Redis). What is checked for every row: the status,
the problem+json body the proxy makes itself (content type, type/title/status/detail/code), the
headers that matter, and how often the upstream was called. The If-Match (428/412) and
``from: fingerprint`` rows live in test_patterns.py; storms and concurrency in test_storm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from tests.conftest import HOST, ProxyFactory, Upstream, free_port

PROBLEM_TYPE_BASE = "https://idemproxy.dev/problems/"
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}
BODY = b'{"item": "tea", "qty": 1}'
SLOW = "1.0"  # seconds the upstream takes when a test needs a request to stay in flight
REQUEST_TIMEOUT = 15.0


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class ClientAnswer:
    """An answer as aiohttp's client received it (raw-socket tests use tests.raw_reply.Reply)."""

    status: int
    raw: list[tuple[str, str]]  # response headers as sent, in order, duplicates kept
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"

    def raw_without_replay_marker(self) -> list[tuple[str, str]]:
        return [(n, v) for n, v in self.raw if n.lower() != "idempotent-replayed"]


async def send(
    http: aiohttp.ClientSession,
    base: str,
    path: str = "/orders",
    *,
    method: str = "POST",
    key: str | None = "key-1",
    body: object = BODY,
    headers: Mapping[str, str] | None = None,
) -> ClientAnswer:
    sent: dict[str, str] = {}
    if key is not None:
        sent["Idempotency-Key"] = key
    sent.update(headers or {})
    async with http.request(
        method,
        base + path,
        data=body,
        headers=sent,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    ) as response:
        data = await response.read()
        raw = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in response.raw_headers]
        return ClientAnswer(response.status, raw, CIMultiDict(response.headers), data)


def assert_problem(reply: ClientAnswer, status: int, code: str) -> dict[str, object]:
    assert reply.status == status, (reply.status, reply.body)
    content_type = reply.headers.get("Content-Type", "")
    assert content_type.split(";")[0].strip().lower() == "application/problem+json"
    doc = reply.json()
    assert isinstance(doc, dict)
    assert set(doc) >= PROBLEM_FIELDS, doc
    assert doc["code"] == code
    assert doc["status"] == status
    assert doc["type"] == PROBLEM_TYPE_BASE + code.replace("_", "-")
    assert isinstance(doc["title"], str)
    assert doc["title"]
    assert isinstance(doc["detail"], str)
    return doc


def assert_fresh_upstream_answer(reply: ClientAnswer, serial: int, status: int = 201) -> None:
    """The recording upstream's own answer number ``serial``, not a replay."""
    assert reply.status == status, (reply.status, reply.body)
    assert not reply.replayed
    assert "Idempotent-Replayed" not in reply.headers
    assert reply.json() == {"serial": serial}
    assert reply.headers["X-Serial"] == str(serial)


def assert_replay_of(replay: ClientAnswer, original: ClientAnswer) -> None:
    """Same status, same headers in the same order (duplicates kept), same bytes, plus the mark."""
    assert replay.status == original.status
    assert replay.body == original.body
    assert [v for n, v in replay.raw if n.lower() == "idempotent-replayed"] == ["true"]
    assert replay.raw_without_replay_marker() == original.raw_without_replay_marker()


def assert_problem_replay_of(replay: ClientAnswer, original: ClientAnswer) -> None:
    """A stored answer the proxy made itself (504/502): same status, headers and bytes, marked.

    The one header that may differ is the value of ``Date``: the original did not come from the
    upstream, so its Date was the proxy's clock when it answered (not part of the stored record).
    """
    assert replay.status == original.status
    assert replay.body == original.body
    assert [v for n, v in replay.raw if n.lower() == "idempotent-replayed"] == ["true"]
    replayed = replay.raw_without_replay_marker()
    assert [n for n, _ in replayed] == [n for n, _ in original.raw]
    assert [(n, v) for n, v in replayed if n.lower() != "date"] == [
        (n, v) for n, v in original.raw if n.lower() != "date"
    ]


async def wait_for_calls(upstream: Any, count: int) -> None:
    """Until the upstream has seen ``count`` calls (so the first request holds its lease)."""
    for _ in range(1000):  # bounded: 5 s at most
        if upstream.count() >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the upstream saw {upstream.count()} calls, not {count}")


async def bounded(task: asyncio.Task[ClientAnswer]) -> ClientAnswer:
    async with asyncio.timeout(REQUEST_TIMEOUT):
        return await task


@contextlib.asynccontextmanager
async def own_proxy(policy: str, upstream_url: str, store: str, prefix: str) -> AsyncIterator[str]:
    """A proxy whose upstream is ``upstream_url`` (``make_proxy`` always uses the fixture's)."""
    config = load_text(
        policy,
        flags=Overrides(listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=upstream_url, store=store),
        environ=dict(os.environ),
    )
    config = replace(config, store=replace(config.store, key_prefix=prefix))
    server = ProxyServer(config)
    await server.start()
    try:
        host, port = server.address
        yield f"http://{host}:{port}"
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def recording_upstream_on(kind: type[Any], port: int) -> AsyncIterator[Any]:
    """Another recording upstream (``kind``: the ``upstream`` fixture's class) on ``port``."""
    recorder = kind()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host=HOST, port=port)
    await server.start_server()
    recorder.server = server
    try:
        yield recorder
    finally:
        await server.close()


REQUIRED = """
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
"""


# --- key absent --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_block", "path"),
    [
        pytest.param("{required: true}", "/orders", id="header"),
        pytest.param("{from: body, pointer: /client_id, required: true}", "/orders", id="body"),
        pytest.param("{from: query, name: rid, required: true}", "/orders?other=1", id="query"),
    ],
)
async def test_required_key_absent_is_400_and_upstream_not_called(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    key_block: str,
    path: str,
) -> None:
    policy = f"""
routes:
  - match: {{methods: [POST], path: /orders}}
    key: {key_block}
"""
    proxy = await make_proxy(policy, store=store_url)
    reply = await send(http, proxy.url, path, key=None)
    assert_problem(reply, 400, "idempotency_key_missing")
    assert not reply.replayed
    assert upstream.count() == 0


async def test_optional_key_absent_is_forwarded_unprotected(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    first = await send(http, proxy.url, key=None)
    second = await send(http, proxy.url, key=None)
    assert_fresh_upstream_answer(first, 1)
    assert_fresh_upstream_answer(second, 2)
    assert upstream.count() == 2
    assert upstream.calls[0].body == upstream.calls[1].body == BODY


# --- malformed keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_key",
    [
        pytest.param("", id="empty"),
        pytest.param("k" * 256, id="256-chars"),
        pytest.param("ab c", id="space-inside"),
        pytest.param("ab\tc", id="tab-inside"),
        pytest.param('"abc', id="unterminated-quote"),
        pytest.param('"ab"c"', id="quote-inside-quotes"),
        pytest.param('"a\\bc"', id="bad-escape"),
        pytest.param('""', id="empty-quoted"),
        pytest.param('"ab c"', id="quoted-space"),
        pytest.param('"' + "k" * 256 + '"', id="quoted-256-chars"),
    ],
)
async def test_malformed_key_is_400_invalid(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    raw_key: str,
) -> None:
    proxy = await make_proxy(REQUIRED, store=store_url)
    reply = await send(http, proxy.url, key=raw_key)
    assert_problem(reply, 400, "idempotency_key_invalid")
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "raw_key",
    [
        pytest.param("k" * 255, id="bare-255"),
        pytest.param('"' + "k" * 255 + '"', id="quoted-255"),
        pytest.param("!~azAZ09-_.:/+=", id="visible-ascii-edges"),
    ],
)
async def test_longest_and_edge_keys_are_accepted(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    raw_key: str,
) -> None:
    proxy = await make_proxy(REQUIRED, store=store_url)
    first = await send(http, proxy.url, key=raw_key)
    assert_fresh_upstream_answer(first, 1)
    again = await send(http, proxy.url, key=raw_key)
    assert_replay_of(again, first)
    assert upstream.count() == 1


async def test_quoted_and_bare_forms_are_the_same_key(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(REQUIRED, store=store_url)
    first = await send(http, proxy.url, key='"abc"')
    assert_fresh_upstream_answer(first, 1)
    second = await send(http, proxy.url, key="abc")
    assert_replay_of(second, first)
    third = await send(http, proxy.url, key='"abc"')
    assert_replay_of(third, first)
    assert upstream.count() == 1
    # An escaped quote inside the structured-field string is the bare character.
    escaped = await send(http, proxy.url, key='"a\\"b"')
    assert_fresh_upstream_answer(escaped, 2)
    assert_replay_of(await send(http, proxy.url, key='a"b'), escaped)
    assert upstream.count() == 2


# --- request body limit ------------------------------------------------------------------------

SMALL_BODY_LIMIT = """
defaults:
  max_request_body: 100
"""


async def test_body_over_limit_with_content_length_is_413(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(SMALL_BODY_LIMIT, store=store_url)
    reply = await send(http, proxy.url, body=b"x" * 101)
    assert_problem(reply, 413, "request_too_large")
    assert upstream.count() == 0
    # The key was not taken by the refused request: the same key with a fitting body runs.
    fits = await send(http, proxy.url, body=b"x" * 100)
    assert_fresh_upstream_answer(fits, 1)
    assert upstream.calls[0].body == b"x" * 100


async def test_declared_length_over_limit_is_413_before_the_body_arrives(
    make_proxy: ProxyFactory, upstream: Upstream, store_url: str
) -> None:
    proxy = await make_proxy(SMALL_BODY_LIMIT, store=store_url)
    host, port = proxy.server.address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # Content-Length promises 1 MB; only 10 bytes come. The answer must not wait for more.
        writer.write(
            b"POST /orders HTTP/1.1\r\nHost: proxy\r\nIdempotency-Key: big-1\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"x" * 10
        )
        await writer.drain()
        async with asyncio.timeout(5):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            fields = dict(line.split(": ", 1) for line in lines[1:] if line)
            body = await reader.readexactly(int(fields["Content-Length"]))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert lines[0].startswith("HTTP/1.1 413 ")
    reply = ClientAnswer(413, list(fields.items()), CIMultiDict(fields), body)
    assert_problem(reply, 413, "request_too_large")
    assert upstream.count() == 0


async def test_chunked_body_over_limit_is_413(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(SMALL_BODY_LIMIT, store=store_url)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * 50

    reply = await send(http, proxy.url, body=chunks())
    assert_problem(reply, 413, "request_too_large")
    assert upstream.count() == 0


async def test_chunked_body_within_limit_is_forwarded(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(SMALL_BODY_LIMIT, store=store_url)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(2):
            yield b"y" * 50

    reply = await send(http, proxy.url, body=chunks())
    assert_fresh_upstream_answer(reply, 1)
    assert upstream.calls[0].body == b"y" * 100


# --- new key and replay ------------------------------------------------------------------------


async def test_new_key_returns_upstream_answer_and_retry_replays_it(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    first = await send(http, proxy.url)
    assert_fresh_upstream_answer(first, 1)
    assert first.headers.getall("Set-Cookie") == ["session=s1; Path=/", "theme=dark; Path=/"]
    assert first.headers["Location"] == "/orders/1"
    assert upstream.calls[0].body == BODY
    assert upstream.calls[0].path_qs == "/orders"

    # Unchanged: the same headers, in the same order, as the upstream itself sends.
    async with http.post(
        upstream.url + "/direct", data=BODY, timeout=aiohttp.ClientTimeout(total=10)
    ) as direct:
        await direct.read()
        direct_names = [n.decode("latin-1") for n, _ in direct.raw_headers]
        direct_type = direct.headers["Content-Type"]
    assert [n for n, _ in first.raw] == direct_names
    assert first.headers["Content-Type"] == direct_type == "application/json"

    for _ in range(2):
        again = await send(http, proxy.url)
        assert_replay_of(again, first)
        assert again.headers.getall("Set-Cookie") == ["session=s1; Path=/", "theme=dark; Path=/"]
        assert again.headers["Location"] == "/orders/1"
    assert upstream.count("/orders") == 1


# --- in flight -----------------------------------------------------------------------------------


async def test_in_flight_duplicate_with_reject_is_409(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    slow = {"X-Test-Delay": SLOW}
    first = asyncio.create_task(send(http, proxy.url, headers=slow))
    await wait_for_calls(upstream, 1)
    duplicate = await send(http, proxy.url, headers=slow)
    assert_problem(duplicate, 409, "request_in_progress")
    assert duplicate.headers.get("Retry-After") == "1"
    original = await bounded(first)
    assert_fresh_upstream_answer(original, 1)
    after = await send(http, proxy.url, headers=slow)
    assert_replay_of(after, original)
    assert upstream.count() == 1


WAIT = """
defaults:
  concurrency: wait
  wait_timeout: 10s
"""


async def test_in_flight_duplicate_with_wait_gets_the_replay(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(WAIT, store=store_url)
    slow = {"X-Test-Delay": SLOW}
    first = asyncio.create_task(send(http, proxy.url, headers=slow))
    await wait_for_calls(upstream, 1)
    duplicate = await send(http, proxy.url, headers=slow)
    original = await bounded(first)
    assert_fresh_upstream_answer(original, 1)
    assert_replay_of(duplicate, original)
    assert upstream.count() == 1


async def test_wait_past_wait_timeout_is_409(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    policy = """
defaults:
  concurrency: wait
  wait_timeout: 200ms
"""
    proxy = await make_proxy(policy, store=store_url)
    first = asyncio.create_task(send(http, proxy.url, headers={"X-Test-Delay": "1.5"}))
    await wait_for_calls(upstream, 1)
    duplicate = await send(http, proxy.url)
    assert_problem(duplicate, 409, "request_in_progress")
    assert duplicate.headers.get("Retry-After") == "1"
    original = await bounded(first)
    assert_fresh_upstream_answer(original, 1)
    assert upstream.count() == 1


# --- key reuse ---------------------------------------------------------------------------------

REUSES = [
    pytest.param({"body": b'{"item": "tea", "qty": 2}'}, id="other-body"),
    pytest.param({"path": "/refunds"}, id="other-path"),
    pytest.param({"method": "PATCH"}, id="other-method"),
    pytest.param({"path": "/orders?coupon=1"}, id="other-query"),
]


@pytest.mark.parametrize("change", REUSES)
async def test_same_key_other_request_after_completion_is_422(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    change: dict[str, Any],
) -> None:
    proxy = await make_proxy("", store=store_url)
    first = await send(http, proxy.url)
    assert_fresh_upstream_answer(first, 1)
    reused = await send(http, proxy.url, **change)
    assert_problem(reused, 422, "idempotency_key_reused")
    assert not reused.replayed
    assert b"serial" not in reused.body
    assert "Set-Cookie" not in reused.headers
    assert "Location" not in reused.headers
    assert upstream.count() == 1
    # The stored answer still belongs to the first request.
    assert_replay_of(await send(http, proxy.url), first)
    assert upstream.count() == 1


@pytest.mark.parametrize("change", REUSES)
async def test_same_key_other_request_in_flight_is_422(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    change: dict[str, Any],
) -> None:
    proxy = await make_proxy("", store=store_url)
    first = asyncio.create_task(send(http, proxy.url, headers={"X-Test-Delay": SLOW}))
    await wait_for_calls(upstream, 1)
    reused = await send(http, proxy.url, **change)
    assert_problem(reused, 422, "idempotency_key_reused")
    assert b"serial" not in reused.body
    original = await bounded(first)
    assert_fresh_upstream_answer(original, 1)
    assert upstream.count() == 1


async def test_same_key_on_another_route_is_422(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    policy = """
routes:
  - name: orders
    match: {methods: [POST], path: /orders}
  - name: refunds
    match: {methods: [POST], path: /refunds}
    ttl: 1h
"""
    proxy = await make_proxy(policy, store=store_url)
    first = await send(http, proxy.url, "/orders")
    assert_fresh_upstream_answer(first, 1)
    other_route = await send(http, proxy.url, "/refunds")
    assert_problem(other_route, 422, "idempotency_key_reused")
    assert b"serial" not in other_route.body
    assert upstream.count() == 1


# --- fingerprints and key sources ----------------------------------------------------------------


async def test_json_bodies_are_compared_by_value(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    first = await send(http, proxy.url, body=b'{"a": 1, "b": {"x": [1, 2], "y": null}}')
    assert_fresh_upstream_answer(first, 1)
    same = await send(http, proxy.url, body=b'{ "b":{"y":null,"x":[1,2]},\n  "a":1 }')
    assert_replay_of(same, first)
    other = await send(http, proxy.url, body=b'{"a": 1, "b": {"x": [2, 1], "y": null}}')
    assert_problem(other, 422, "idempotency_key_reused")
    assert upstream.count() == 1


BODY_KEY = """
routes:
  - match: {methods: [POST], path: /users}
    key: {from: body, pointer: /client_id}
"""


async def test_key_from_body_json_pointer(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(BODY_KEY, store=store_url)
    first = await send(http, proxy.url, "/users", key=None, body=b'{"client_id": "c-1", "n": 1}')
    assert_fresh_upstream_answer(first, 1)
    again = await send(http, proxy.url, "/users", key=None, body=b'{"n": 1, "client_id": "c-1"}')
    assert_replay_of(again, first)
    other_key = await send(
        http, proxy.url, "/users", key=None, body=b'{"client_id": "c-2", "n": 1}'
    )
    assert_fresh_upstream_answer(other_key, 2)
    reused = await send(http, proxy.url, "/users", key=None, body=b'{"client_id": "c-1", "n": 2}')
    assert_problem(reused, 422, "idempotency_key_reused")
    # An Idempotency-Key header plays no part on this route: the body field is the key.
    header_too = await send(
        http, proxy.url, "/users", key="whatever", body=b'{"client_id": "c-1", "n": 1}'
    )
    assert_replay_of(header_too, first)
    assert upstream.count() == 2
    # Without the body field the key is absent; it is optional here, so both run, unprotected.
    for serial in (3, 4):
        bare = await send(http, proxy.url, "/users", key=None, body=b'{"n": 1}')
        assert_fresh_upstream_answer(bare, serial)
    assert upstream.count() == 4
    # A gzip body: the upstream would decode it and read client_id, the proxy cannot. It ran
    # unprotected as "key absent" (found by the hostile-input audit); now it is refused.
    coded = await send(
        http,
        proxy.url,
        "/users",
        key=None,
        body=gzip.compress(b'{"client_id": "c-9"}'),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert_problem(coded, 400, "idempotency_key_invalid")
    assert upstream.count() == 4


QUERY_KEY = """
routes:
  - match: {methods: [POST], path: /q}
    key: {from: query, name: rid}
"""


async def test_key_from_query_parameter(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(QUERY_KEY, store=store_url)
    first = await send(http, proxy.url, "/q?rid=r-1", key=None)
    assert_fresh_upstream_answer(first, 1)
    assert upstream.calls[0].path_qs == "/q?rid=r-1"
    again = await send(http, proxy.url, "/q?rid=r-1", key=None)
    assert_replay_of(again, first)
    other = await send(http, proxy.url, "/q?rid=r-2", key=None)
    assert_fresh_upstream_answer(other, 2)
    empty = await send(http, proxy.url, "/q?rid=", key=None)
    assert_problem(empty, 400, "idempotency_key_invalid")
    twice = await send(http, proxy.url, "/q?rid=r-3&rid=r-4", key=None)
    assert_problem(twice, 400, "idempotency_key_invalid")
    assert upstream.count() == 2


# --- scoping -----------------------------------------------------------------------------------


async def test_keys_are_scoped_per_authorization(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    alice = {"Authorization": "Bearer alice"}
    bob = {"Authorization": "Bearer bob"}
    a1 = await send(http, proxy.url, headers=alice)
    assert_fresh_upstream_answer(a1, 1)
    # Same key, another credential, even another body: a request of its own, never a 422.
    b1 = await send(http, proxy.url, headers=bob, body=b'{"other": true}')
    assert_fresh_upstream_answer(b1, 2)
    nobody = await send(http, proxy.url)
    assert_fresh_upstream_answer(nobody, 3)

    assert_replay_of(await send(http, proxy.url, headers=alice), a1)
    assert_replay_of(await send(http, proxy.url, headers=bob, body=b'{"other": true}'), b1)
    assert_replay_of(await send(http, proxy.url), nobody)
    assert upstream.count() == 3


# --- upstream statuses ---------------------------------------------------------------------------


async def test_release_status_is_returned_but_not_stored(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    unavailable = {"X-Test-Status": "503"}
    first = await send(http, proxy.url, headers=unavailable)
    assert_fresh_upstream_answer(first, 1, status=503)
    assert first.headers.getall("Set-Cookie") == ["session=s1; Path=/", "theme=dark; Path=/"]
    retry = await send(http, proxy.url, headers=unavailable)
    assert_fresh_upstream_answer(retry, 2, status=503)
    works = await send(http, proxy.url)
    assert_fresh_upstream_answer(works, 3)
    assert_replay_of(await send(http, proxy.url), works)
    assert upstream.count() == 3


async def test_500_is_stored_and_replayed(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    failing = {"X-Test-Status": "500"}
    first = await send(http, proxy.url, headers=failing)
    assert_fresh_upstream_answer(first, 1, status=500)
    retry = await send(http, proxy.url, headers=failing)
    assert_replay_of(retry, first)
    # The fingerprint does not include headers: even without the status header it is a replay.
    assert_replay_of(await send(http, proxy.url), first)
    assert upstream.count() == 1


# --- upstream failures ---------------------------------------------------------------------------


async def test_unreachable_upstream_is_502_and_key_released(
    upstream: Upstream, http: aiohttp.ClientSession, store_url: str, prefix: str
) -> None:
    port = free_port()
    async with own_proxy("", f"http://{HOST}:{port}", store_url, prefix) as url:
        first = await send(http, url)
        assert_problem(first, 502, "upstream_unavailable")
        assert not first.replayed
        # Nothing was sent, so the key is free: once the upstream is there, the retry runs.
        async with recording_upstream_on(type(upstream), port) as late:
            retry = await send(http, url)
            assert_fresh_upstream_answer(retry, 1)
            assert_replay_of(await send(http, url), retry)
            assert late.count() == 1


TIMEOUT = """
upstream:
  timeout: 300ms
"""


async def test_upstream_timeout_is_504_and_stored(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(TIMEOUT, store=store_url)
    slow = {"X-Test-Delay": SLOW}
    first = await send(http, proxy.url, headers=slow)
    assert_problem(first, 504, "upstream_timeout")
    assert not first.replayed
    retry = await send(http, proxy.url, headers=slow)
    assert_problem_replay_of(retry, first)
    assert_problem(retry, 504, "upstream_timeout")
    assert upstream.count() == 1


async def test_upstream_timeout_with_ambiguous_release_runs_again(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(TIMEOUT + "defaults:\n  ambiguous: release\n", store=store_url)
    first = await send(http, proxy.url, headers={"X-Test-Delay": SLOW})
    assert_problem(first, 504, "upstream_timeout")
    retry = await send(http, proxy.url)
    assert_fresh_upstream_answer(retry, 2)
    assert upstream.count() == 2


async def test_dropped_connection_is_502_and_stored(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    drop = {"X-Test-Drop": "1"}
    first = await send(http, proxy.url, headers=drop)
    assert_problem(first, 502, "upstream_unavailable")
    assert not first.replayed
    retry = await send(http, proxy.url, headers=drop)
    assert_problem_replay_of(retry, first)
    assert_problem(retry, 502, "upstream_unavailable")
    assert_problem_replay_of(await send(http, proxy.url), first)
    assert upstream.count() == 1


async def test_dropped_connection_with_ambiguous_release_runs_again(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("defaults:\n  ambiguous: release\n", store=store_url)
    first = await send(http, proxy.url, headers={"X-Test-Drop": "1"})
    assert_problem(first, 502, "upstream_unavailable")
    retry = await send(http, proxy.url)
    assert_fresh_upstream_answer(retry, 2)
    assert upstream.count() == 2


# --- response size -----------------------------------------------------------------------------

SMALL_STORE = """
defaults:
  max_stored_response: 1KiB
"""


async def test_response_over_storable_size_is_streamed_then_not_replayable(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(SMALL_STORE, store=store_url)
    big = {"X-Test-Size": "200000"}  # several reads' worth: the rest must be streamed too
    first = await send(http, proxy.url, headers=big)
    assert first.status == 201
    assert first.body == b"x" * 200000
    assert first.headers["Content-Type"] == "application/json"
    assert not first.replayed
    assert first.headers.getall("Set-Cookie") == ["session=s1; Path=/", "theme=dark; Path=/"]
    assert first.headers["Location"] == "/orders/1"
    retry = await send(http, proxy.url, headers=big)
    assert_problem(retry, 409, "response_not_replayable")
    assert b"xxxx" not in retry.body
    assert upstream.count() == 1


async def test_response_of_exactly_storable_size_is_replayed(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(SMALL_STORE, store=store_url)
    first = await send(http, proxy.url, headers={"X-Test-Size": "1024"})
    assert first.status == 201
    assert first.body == b"x" * 1024
    assert_replay_of(await send(http, proxy.url), first)
    assert upstream.count() == 1


async def test_a_released_status_too_large_to_store_still_releases_the_key(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    # A 503 is "try again" whatever its size: a large error page must not leave a record that
    # answers every retry with 409 response_not_replayable.
    proxy = await make_proxy(SMALL_STORE, store=store_url)
    large_503 = {"X-Test-Status": "503", "X-Test-Size": "2000"}
    first = await send(http, proxy.url, headers=large_503)
    assert first.status == 503
    assert first.body == b"x" * 2000
    assert not first.replayed
    retry = await send(http, proxy.url)
    assert_fresh_upstream_answer(retry, 2)
    assert_replay_of(await send(http, proxy.url), retry)
    assert upstream.count() == 2


# --- store unreachable (Redis only: the memory store cannot be unreachable) ---------------------


async def test_store_unreachable_fail_closed_is_503(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    dead_store = f"redis://{HOST}:{free_port()}/0"
    proxy = await make_proxy("store:\n  on_error: fail_closed\n", store=dead_store)
    reply = await send(http, proxy.url)
    assert_problem(reply, 503, "store_unavailable")
    retry_after = reply.headers.get("Retry-After", "")
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    assert upstream.count() == 0


async def test_store_unreachable_fail_open_forwards_unprotected(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    dead_store = f"redis://{HOST}:{free_port()}/0"
    proxy = await make_proxy("store:\n  on_error: fail_open\n", store=dead_store)
    first = await send(http, proxy.url)
    assert_fresh_upstream_answer(first, 1)
    second = await send(http, proxy.url)
    assert_fresh_upstream_answer(second, 2)
    assert upstream.count() == 2
    assert [c.body for c in upstream.calls] == [BODY, BODY]


# --- lease renewal -------------------------------------------------------------------------------


async def test_lease_is_renewed_while_the_upstream_call_runs(
    http: aiohttp.ClientSession, store_url: str, prefix: str
) -> None:
    # Behaviour, not elapsed time: the upstream holds its answer until the test releases it, so
    # duplicates sent after one and after two lock_ttls (the sleeps are lower bounds only) surely
    # arrive while the original runs. Without renewal the lease would be gone and a duplicate
    # would run; with it each is a 409. lock_ttl 1s (renewed every 333 ms) rather than 300 ms:
    # a loaded machine may stall the renewing loop for a few hundred ms.
    arrived, release = asyncio.Event(), asyncio.Event()
    calls: list[bytes] = []

    async def held(request: web.Request) -> web.Response:
        calls.append(await request.read())
        arrived.set()
        await asyncio.wait_for(release.wait(), REQUEST_TIMEOUT)
        return web.Response(status=201, body=b'{"held": %d}' % len(calls))

    app = web.Application()
    app.router.add_post("/orders", held)
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server()
    upstream_url = f"http://{HOST}:{server.port}"
    try:
        async with own_proxy("defaults:\n  lock_ttl: 1s\n", upstream_url, store_url, prefix) as url:
            first = asyncio.create_task(send(http, url))
            await asyncio.wait_for(arrived.wait(), REQUEST_TIMEOUT)
            await asyncio.sleep(1.2)  # past lock_ttl: without renewal the lease would be gone
            early = await send(http, url)
            await asyncio.sleep(1.0)  # past two lock_ttls
            late = await send(http, url)
            release.set()
            original = await bounded(first)
            replayed = await send(http, url)
    finally:
        release.set()
        await server.close()
    assert_problem(early, 409, "request_in_progress")
    assert_problem(late, 409, "request_in_progress")
    assert original.status == 201
    assert original.body == b'{"held": 1}'
    assert_replay_of(replayed, original)
    assert len(calls) == 1
