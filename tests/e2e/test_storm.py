"""Storms: many concurrent requests under one key (or many keys) against a slow upstream.

Every storm runs on both stores. Whatever the interleaving, the upstream must see exactly one
call per key, and every answer must be the original, a replay of it, or a 409.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.conftest import ProxyFactory, Upstream

STORM = 100
SLOW = {"X-Test-Delay": "0.3"}
BODY = b'{"amount": 1000, "currency": "EUR"}'


async def post(
    http: aiohttp.ClientSession, base: str, key: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(
        base + "/payments",
        data=BODY,
        headers={"Idempotency-Key": key, **(headers or {})},
        timeout=aiohttp.ClientTimeout(total=20),
    ) as response:
        return response.status, dict(response.headers), await response.read()


async def storm(
    http: aiohttp.ClientSession, base: str, keys: list[str]
) -> list[tuple[int, dict[str, str], bytes]]:
    async with asyncio.timeout(40):
        return await asyncio.gather(*(post(http, base, key, SLOW) for key in keys))


async def test_storm_same_key_reject(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("defaults:\n  concurrency: reject\n", store=store_url)
    replies = await storm(http, proxy.url, ["storm-key"] * STORM)
    assert upstream.count() == 1
    originals = [r for r in replies if r[0] == 201 and "Idempotent-Replayed" not in r[1]]
    assert len(originals) == 1
    original_body = originals[0][2]
    assert json.loads(original_body) == {"serial": 1}
    for status, headers, body in replies:
        if status == 201:
            assert body == original_body
        else:
            assert status == 409, (status, body)
            assert headers["Content-Type"] == "application/problem+json"
            assert json.loads(body)["code"] == "request_in_progress"
            assert headers["Retry-After"] == "1"
    # Afterwards every retry is a replay of the one original.
    status, headers, body = await post(http, proxy.url, "storm-key")
    assert (status, headers.get("Idempotent-Replayed"), body) == (201, "true", original_body)
    assert upstream.count() == 1


async def test_storm_same_key_wait(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    policy = "defaults:\n  concurrency: wait\n  wait_timeout: 20s\n"
    proxy = await make_proxy(policy, store=store_url)
    replies = await storm(http, proxy.url, ["storm-key"] * STORM)
    assert upstream.count() == 1
    assert [status for status, _, _ in replies] == [201] * STORM
    assert {body for _, _, body in replies} == {b'{"serial": 1}'}
    fresh = [h for _, h, _ in replies if "Idempotent-Replayed" not in h]
    assert len(fresh) == 1
    assert all(h.get("Idempotent-Replayed") == "true" for _, h, _ in replies if h not in fresh)
    assert {h["Location"] for _, h, _ in replies} == {"/orders/1"}


async def test_storm_distinct_keys_each_run_once(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy("", store=store_url)
    keys = [f"key-{i}" for i in range(STORM)]
    replies = await storm(http, proxy.url, keys)
    assert upstream.count() == STORM
    assert [status for status, _, _ in replies] == [201] * STORM
    assert not any("Idempotent-Replayed" in h for _, h, _ in replies)
    serials = {json.loads(body)["serial"] for _, _, body in replies}
    assert serials == set(range(1, STORM + 1))
    assert sorted(c.headers["Idempotency-Key"] for c in upstream.calls) == sorted(keys)
