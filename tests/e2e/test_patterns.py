"""Protection for clients that cannot change: derived keys, If-Match enforcement, replay status.

Every behaviour runs against both stores, through a real proxy to a real upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from idemproxy.app import ProxyServer
from idemproxy.config import ConfigError, Overrides, load_text
from tests.conftest import HOST, ProxyFactory, Upstream, free_port

FORM = """
routes:
  - match: {methods: [POST], path: /forms/contact}
    key: {from: fingerprint, window: %s}
"""


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url, data=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_identical_payloads_within_the_window_run_once(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(FORM % "10s", store=store_url)
    url = proxy.url + "/forms/contact"
    first = await post(http, url, b'{"email": "a@example.com", "text": "hi"}')
    second = await post(http, url, b'{"text": "hi", "email": "a@example.com"}')
    other = await post(http, url, b'{"email": "b@example.com", "text": "hi"}')
    assert first[0] == 201
    assert second[0] == 201
    assert second[2] == first[2]
    assert second[1]["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first[1]
    assert other[0] == 201
    assert other[2] != first[2]
    assert upstream.count() == 2


async def test_after_the_window_the_same_payload_runs_again(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(FORM % "300ms", store=store_url)
    url = proxy.url + "/forms/contact"
    await post(http, url, b"name=a")
    await asyncio.sleep(0.6)
    again = await post(http, url, b"name=a")
    assert "Idempotent-Replayed" not in again[1]
    assert upstream.count() == 2


async def test_an_in_flight_duplicate_of_a_derived_key_waits_for_the_replay(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(FORM % "10s", store=store_url)
    url = proxy.url + "/forms/contact"
    answers = await asyncio.gather(
        *(post(http, url, b"name=a", **{"X-Test-Delay": "0.3"}) for _ in range(10))
    )
    assert {status for status, _, _ in answers} == {201}
    assert len({body for _, _, body in answers}) == 1
    assert upstream.count() == 1


async def test_written_concurrency_reject_applies_to_derived_keys(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(FORM % "10s" + "    concurrency: reject\n", store=store_url)
    url = proxy.url + "/forms/contact"
    slow = asyncio.create_task(post(http, url, b"name=a", **{"X-Test-Delay": "2"}))
    for _ in range(500):  # until the upstream runs the first (it holds the lease), 5 s at most
        if upstream.count():
            break
        await asyncio.sleep(0.01)
    assert upstream.count() == 1
    status, headers, _ = await post(http, url, b"name=a", **{"X-Test-Delay": "2"})
    assert (await slow)[0] == 201
    assert status == 409
    assert headers["Retry-After"] == "1"
    assert upstream.count() == 1


async def test_a_client_key_wins_over_the_derived_one(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(FORM % "10s", store=store_url)
    url = proxy.url + "/forms/contact"
    await post(http, url, b"name=a", **{"Idempotency-Key": "k1"})
    # Same payload, another client key: a new request, not a replay of the first.
    second = await post(http, url, b"name=a", **{"Idempotency-Key": "k2"})
    assert "Idempotent-Replayed" not in second[1]
    # Same client key, other payload: a reuse.
    reused = await post(http, url, b"name=b", **{"Idempotency-Key": "k1"})
    assert reused[0] == 422
    invalid = await post(http, url, b"name=a", **{"Idempotency-Key": ""})
    assert invalid[0] == 400
    assert upstream.count() == 2


ARTICLES = """
routes:
  - match: {methods: [PUT, PATCH], path: "/articles/{id}"}
    require_if_match: true
    etag_from_get: %s
"""


async def test_require_if_match_answers_428_without_if_match(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(ARTICLES % "false", store=store_url)
    async with http.put(proxy.url + "/articles/1", data=b"{}") as response:
        assert response.status == 428
        assert response.content_type == "application/problem+json"
        assert (await response.json())["code"] == "precondition_required"
    async with http.put(
        proxy.url + "/articles/1", data=b"{}", headers={"If-Match": '"v1"'}
    ) as response:
        assert response.status == 201
    assert upstream.count() == 1
    assert upstream.calls[0].headers["If-Match"] == '"v1"'


@pytest.fixture
async def etag_upstream() -> AsyncIterator[Upstream]:
    """An upstream whose article has ETag "v1" and that counts writes."""
    recorder = Upstream()

    async def get(request: web.Request) -> web.Response:
        return web.Response(body=b"article", headers={"ETag": '"v1"'})

    app = web.Application()
    app.router.add_get("/articles/{id}", get)
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server()
    recorder.server = server
    yield recorder
    await server.close()


async def test_etag_from_get_answers_412_on_a_stale_if_match(
    etag_upstream: Upstream, http: aiohttp.ClientSession, store_url: str, prefix: str
) -> None:
    config = load_text(
        ARTICLES % "true" + f"store: {{key_prefix: '{prefix}'}}\n",
        flags=Overrides(
            listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=etag_upstream.url, store=store_url
        ),
    )
    server = ProxyServer(config)
    await server.start()
    try:
        url = "http://{}:{}/articles/7".format(*server.address)
        async with http.put(url, data=b"x", headers={"If-Match": '"v0"'}) as response:
            assert response.status == 412
            assert (await response.json())["code"] == "precondition_failed"
        assert etag_upstream.count() == 0
        headers = {"If-Match": '"v0", "v1"', "Idempotency-Key": "edit-1"}
        async with http.put(url, data=b"x", headers=headers) as response:
            assert response.status == 201
        assert etag_upstream.count() == 1
        # The retry is a replay, not a 412, although the write may have changed the ETag.
        async with http.put(url, data=b"x", headers=headers) as response:
            assert response.status == 201
            assert response.headers["Idempotent-Replayed"] == "true"
        assert etag_upstream.count() == 1
        async with http.put(url, data=b"x", headers={"If-Match": 'W/"v1"'}) as response:
            assert response.status == 412
    finally:
        await server.stop()


async def test_etag_from_get_lets_if_match_star_through_for_a_resource_without_an_etag(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """README: ``*`` matches any existing resource. One whose GET answered 2xx without an
    ``ETag`` was taken for no resource and got 412 (found by hand: PUT with ``If-Match: *``
    through config/patterns.yaml's edit-profile route on a real ``idemproxy run``)."""
    proxy = await make_proxy(ARTICLES % "true")  # the upstream answers every GET 201, no ETag
    url = proxy.url + "/articles/1"
    async with http.put(url, data=b"x", headers={"If-Match": "*"}) as response:
        assert response.status == 201
    async with http.put(url, data=b"x", headers={"If-Match": '"v1"'}) as response:
        assert response.status == 412  # no ETag for a listed tag to match
    assert [call.method for call in upstream.calls] == ["GET", "PUT", "GET"]


async def test_replay_status_relabels_a_201_replay(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    policy = """
routes:
  - match: {methods: [POST], path: /signups}
    replay: {status: 200}
"""
    proxy = await make_proxy(policy, store=store_url)
    url = proxy.url + "/signups"
    first = await post(http, url, b"a", **{"Idempotency-Key": "s1"})
    second = await post(http, url, b"a", **{"Idempotency-Key": "s1"})
    assert first[0] == 201
    assert second[0] == 200
    assert second[2] == first[2]
    assert second[1]["Location"] == first[1]["Location"]
    # Other statuses are replayed as they were.
    await post(http, url, b"b", **{"Idempotency-Key": "s2", "X-Test-Status": "202"})
    third = await post(http, url, b"b", **{"Idempotency-Key": "s2", "X-Test-Status": "202"})
    assert third[0] == 202


@pytest.mark.parametrize(
    ("policy", "path"),
    [
        ("routes:\n  - match: {path: /a}\n    key: {window: 5s}\n", "routes[0].key.window"),
        (
            "routes:\n  - match: {path: /a}\n    key: {from: fingerprint, required: true}\n",
            "routes[0].key.required",
        ),
        ("routes:\n  - match: {path: /a}\n    replay: {status: 302}\n", "routes[0].replay.status"),
        ("routes:\n  - match: {path: /a}\n    replay: {}\n", "routes[0].replay.status"),
    ],
)
def test_pattern_fields_are_validated(policy: str, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(policy)
    assert [p.path for p in caught.value.problems] == [path]


def test_derived_keys_wait_unless_concurrency_is_written() -> None:
    route = load_text(FORM % "10s").routes[0]
    assert route.derived_concurrency == "wait"
    assert route.concurrency == "reject"
    assert route.key.window == 10.0
    written = load_text("defaults: {concurrency: reject}\n" + FORM % "10s").routes[0]
    assert written.derived_concurrency == "reject"
