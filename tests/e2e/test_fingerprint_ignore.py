"""``fingerprint.ignore`` (SPEC section 3), end to end: JSON members left out of the fingerprint.

Two requests whose JSON bodies differ only at an ignored pointer are the same request (a
replay); any other difference is a reuse of the key (422). What is forwarded never changes, and
a body that is not JSON is compared as sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from idemproxy.config import load_text
from idemproxy.keys import canonical_body, fingerprint
from tests.conftest import ProxyFactory, Upstream

POLICY = """
defaults:
  fingerprint:
    ignore: [/sent_at, /meta/nonce]
routes:
  - match: {methods: [POST], path: /payments}
    key: {required: true}
  - match: {methods: [POST], path: /forms/contact}
    key: {from: fingerprint, window: 1m}
"""

PATTERNS = (Path(__file__).resolve().parents[2] / "config" / "patterns.yaml").read_text()
FIRST = {"amount": 100, "sent_at": "2026-12-05T10:00:00Z", "meta": {"nonce": "a1", "app": "ios"}}


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, key: str | None = "pay-1"
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with http.post(url, data=body, headers=headers) as response:
        payload = json.loads(await response.read())
        replayed = response.headers.get("Idempotent-Replayed")
        return response.status, {"replayed": replayed, **payload}


def body(**changes: Any) -> bytes:
    document = json.loads(json.dumps(FIRST))
    for name, value in changes.items():
        if name == "nonce":
            document["meta"]["nonce"] = value
        elif value is None:
            del document[name]
        else:
            document[name] = value
    return json.dumps(document).encode()


async def test_a_retry_that_differs_only_at_ignored_members_is_replayed(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(POLICY, store=store_url)
    url = proxy.url + "/payments"
    status, first = await post(http, url, body())
    assert (status, first["replayed"]) == (201, None)
    retries = [
        body(sent_at="2026-12-05T10:00:07Z", nonce="b2"),
        body(sent_at=None),  # an ignored member that is absent is fine
        body(nonce=None),
    ]
    for retry in retries:
        status, answer = await post(http, url, retry)
        assert (status, answer["replayed"]) == (201, "true"), retry
        assert answer["serial"] == first["serial"]
    assert upstream.count("/payments") == 1
    # What is forwarded is the client's body as sent, ignored members included.
    assert upstream.calls[0].body == body()


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(body(amount=200), id="other-member"),
        pytest.param(body(meta={"nonce": "a1", "app": "android"}), id="sibling-of-ignored"),
        pytest.param(body(sent_at={"nested": "x"}, currency="EUR"), id="ignored-and-other"),
    ],
)
async def test_a_retry_that_differs_elsewhere_is_a_key_reuse(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    store_url: str,
    changed: bytes,
) -> None:
    proxy = await make_proxy(POLICY, store=store_url)
    url = proxy.url + "/payments"
    assert (await post(http, url, body()))[0] == 201
    status, answer = await post(http, url, changed)
    assert status == 422
    assert answer["code"] == "idempotency_key_reused"
    assert upstream.count("/payments") == 1


@pytest.mark.parametrize(
    ("first", "retry"),
    [
        # Looks like JSON but is not (a trailing comma): no member can be left out of it.
        (b'{"amount": 100, "sent_at": "t1",}', b'{"amount": 100, "sent_at": "t2",}'),
        # Not JSON either (RFC 8259 6), though Python reads it: NaN, Infinity and null had one
        # canonical form, null, so these were replays (found by the hostile-input audit).
        (b'{"amount": NaN, "sent_at": "t1"}', b'{"amount": null, "sent_at": "t1"}'),
        (b'{"amount": Infinity, "sent_at": "t1"}', b'{"amount": -Infinity, "sent_at": "t1"}'),
    ],
    ids=["trailing-comma", "nan-then-null", "infinity-then-minus-infinity"],
)
async def test_a_body_that_is_not_json_is_compared_as_sent(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    first: bytes,
    retry: bytes,
) -> None:
    proxy = await make_proxy(POLICY)
    url = proxy.url + "/payments"
    assert (await post(http, url, first))[0] == 201
    status, answer = await post(http, url, retry)
    assert (status, answer["code"]) == (422, "idempotency_key_reused")
    assert upstream.count("/payments") == 1


async def test_payload_derived_keys_leave_the_ignored_members_out_too(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(POLICY)
    url = proxy.url + "/forms/contact"
    status, first = await post(http, url, body(), key=None)
    assert status == 201
    status, again = await post(http, url, body(sent_at="later", nonce="other"), key=None)
    assert (status, again["replayed"], again["serial"]) == (201, "true", first["serial"])
    status, other = await post(http, url, body(amount=5), key=None)
    assert (status, other["replayed"]) == (201, None)
    assert upstream.count("/forms/contact") == 2


def test_pointers_follow_rfc_6901() -> None:
    ignore = (("a/b",), ("~c",), ("items", "1"), ("items", "0"), ("list", "01"), ("list", "-"))
    document = {"a/b": 1, "~c": 2, "items": [10, 11, 12], "list": [1], "keep": True}
    left = canonical_body(json.dumps(document).encode(), ignore)
    # Both elements are resolved against the body as sent: removing [0] does not shift [1].
    # "01" (a leading zero) and "-" (past the end) name no element.
    expected = {"items": [12], "list": [1], "keep": True}
    assert left == canonical_body(json.dumps(expected).encode())


def test_ignore_is_only_about_the_body() -> None:
    policy = load_text(POLICY, environ={}).routes[0].fingerprint
    raw = fingerprint(policy, "POST", "/payments", "", lambda name: [], body())
    assert raw == fingerprint(policy, "POST", "/payments", "", lambda name: [], body(sent_at=None))
    assert raw != fingerprint(policy, "POST", "/other", "", lambda name: [], body())
    assert raw != fingerprint(policy, "POST", "/payments", "sent_at=1", lambda name: [], body())


async def test_the_patterns_example_contact_form_leaves_the_send_time_out(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(PATTERNS)
    url = proxy.url + "/forms/contact"
    form = {"email": "a@example.com", "message": "hello"}
    status, first = await post(http, url, json.dumps({**form, "submitted_at": 1}).encode(), None)
    assert status == 201
    status, again = await post(http, url, json.dumps({**form, "submitted_at": 2}).encode(), None)
    assert (status, again["replayed"], again["serial"]) == (201, "true", first["serial"])
    assert upstream.count("/forms/contact") == 1
