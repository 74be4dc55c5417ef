"""``release_statuses`` with status classes (SPEC section 3), end to end with a real upstream.

``[4xx, 503]`` releases every 4xx the upstream answers and 503, and keeps everything else: a
retry of a released request runs again, a retry of a kept one is a replay.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import ProxyFactory, Upstream

POLICY = """
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
    release_statuses: [4xx, 503]
"""


async def post_twice(
    http: aiohttp.ClientSession, url: str, key: str, status: int
) -> list[tuple[int, str | None]]:
    """The first attempt and its retry: (status, Idempotent-Replayed) of each."""
    answers = []
    headers = {"Idempotency-Key": key, "X-Test-Status": str(status)}
    for _ in range(2):
        async with http.post(url + "/orders", data=b'{"qty": 1}', headers=headers) as response:
            await response.read()
            answers.append((response.status, response.headers.get("Idempotent-Replayed")))
    return answers


@pytest.mark.parametrize("status", [400, 404, 418, 499, 503])
async def test_a_status_of_a_released_class_or_code_lets_the_retry_run_again(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    status: int,
) -> None:
    proxy = await make_proxy(POLICY, store=store_url)
    answers = await post_twice(http, proxy.url, f"released-{status}", status)
    assert answers == [(status, None), (status, None)]
    assert upstream.count("/orders") == 2


@pytest.mark.parametrize("status", [200, 201, 399, 500, 502, 504])
async def test_a_status_outside_the_released_ones_is_stored_and_replayed(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    status: int,
) -> None:
    proxy = await make_proxy(POLICY, store=store_url)
    answers = await post_twice(http, proxy.url, f"kept-{status}", status)
    assert answers == [(status, None), (status, "true")]
    assert upstream.count("/orders") == 1
