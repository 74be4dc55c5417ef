"""Clients that retry by themselves, which nobody here wrote, through idemproxy.

The product exists for these clients: they resend an unsafe request when an answer is slow, lost
or a 409/5xx, and rely on the server to run it once. Two of them, each configured as its users do:

- The official Stripe Python SDK (``stripe.StripeClient`` with ``max_network_retries``): it puts
  its own ``Idempotency-Key`` on every POST and retries timeouts, connection errors, 409 and
  every 5xx (``HTTPClient._should_retry``) with a backoff of 0.5 s and more, ignoring
  ``Retry-After``; only ``Stripe-Should-Retry`` changes its mind, ``Idempotent-Replayed`` it does
  not read.
- ``requests`` with ``urllib3.util.Retry`` on an ``HTTPAdapter`` for POSTs: read timeouts and
  409/503 retried, ``Retry-After`` obeyed (``Retry.sleep`` reads it on any status).

The upstream plays a tiny Stripe API on 127.0.0.1: ``POST /v1/charges`` makes a charge with a
unique id and counts its executions. Where a retry must meet the request still in flight, the
upstream holds its answer until the proxy's ``/metrics`` count a ``conflict`` (a 409 answered),
so the overlap is caused, never timed. What is asserted is what can be observed: upstream
executions, the object or bytes each caller ends with, what the client saw attempt by attempt
(a ``requests`` response hook, urllib3's retry history) and the proxy's outcome counts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
import pytest
import requests
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from requests.adapters import HTTPAdapter
from stripe.params import ChargeCreateParams
from urllib3.util import Retry

from tests.conftest import HOST, Call, ProxyFactory, RedisProcess, Upstream, free_port
from tests.httpbin_upstream import ProxyProcess

CHARGE_PARAMS: ChargeCreateParams = {
    "amount": 1000,
    "currency": "eur",
    "source": "tok_visa",
}
CHARGE_FORM = b"amount=1000&currency=eur&source=tok_visa"
# How long the upstream holds an execution waiting for the proxy to count a conflict; past it
# the execution answers anyway and the test fails on the counts, it does not hang.
HOLD_LIMIT = 10.0
POLL_STEP = 0.02  # seconds between two scrapes of /metrics while holding


@pytest.fixture(autouse=True)
def stripe_without_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """With telemetry on (its default) the SDK writes an id to ~/.config/stripe on its first
    request and sends metrics of the last one along with the next: a test leaves $HOME alone."""
    monkeypatch.setattr(stripe, "enable_telemetry", False)


# --- the upstream: a tiny Stripe API ---------------------------------------------------------


class StripeUpstream(Upstream):
    """``POST /v1/charges`` as Stripe answers it: 200 and a charge with a fresh ``ch_`` id, with
    ``Request-Id`` and the request's ``Idempotency-Key`` echoed as response headers.

    ``hold``, when set, is awaited before each execution answers; the first executions answer
    the statuses in ``failures``, one each, with a Stripe ``api_error``. ``answers`` keeps every
    body sent, in order.
    ``GET /get`` answers 200: the readiness probe of ``tests.httpbin_upstream.ProxyProcess``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hold: Callable[[], Awaitable[None]] | None = None
        self.failures: list[int] = []
        self.answers: list[bytes] = []

    async def create_charge(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append(Call(request.method, request.path_qs, dict(request.headers), body))
        if self.hold is not None:
            await self.hold()
        form = {name: values[0] for name, values in parse_qs(body.decode()).items()}
        status = 200
        document: dict[str, object] = {
            "id": f"ch_{uuid.uuid4().hex[:24]}",
            "object": "charge",
            "amount": int(form["amount"]),
            "currency": form["currency"],
            "paid": True,
            "status": "succeeded",
            "livemode": False,
        }
        if self.failures:
            status = self.failures.pop(0)
            document = {"error": {"type": "api_error", "message": "the card network timed out"}}
        payload = json.dumps(document).encode()
        self.answers.append(payload)
        headers = {"Request-Id": f"req_{uuid.uuid4().hex[:14]}"}
        if key := request.headers.get("Idempotency-Key"):
            headers["Idempotency-Key"] = key
        return web.Response(
            status=status, body=payload, content_type="application/json", headers=headers
        )

    async def ready(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")


@pytest.fixture
async def upstream() -> AsyncIterator[StripeUpstream]:
    """Overrides conftest's ``upstream``, so ``make_proxy`` fronts the Stripe stand-in."""
    stripe_api = StripeUpstream()
    app = web.Application()
    app.router.add_post("/v1/charges", stripe_api.create_charge)
    app.router.add_get("/get", stripe_api.ready)
    stripe_api.server = TestServer(app, host=HOST, port=free_port())
    await stripe_api.server.start_server()
    yield stripe_api
    await stripe_api.server.close()


# --- the proxy's outcome counts --------------------------------------------------------------


def outcomes(exposition: str) -> Counter[str]:
    """``idemproxy_requests_total`` by outcome, summed over routes."""
    counted: Counter[str] = Counter()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "idemproxy_requests_total":
                counted[sample.labels["outcome"]] += int(sample.value)
    return counted


async def scrape_outcomes(admin_urls: list[str]) -> Counter[str]:
    """Outcome counts summed over the proxies behind ``admin_urls``."""
    counted: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for url in admin_urls:
            async with http.get(url + "/metrics") as response:
                assert response.status == 200
                counted += outcomes(await response.text())
    return counted


def until_conflicts(admin_urls: list[str], at_least: int) -> Callable[[], Awaitable[None]]:
    """A ``StripeUpstream.hold``: wait until the proxies answered ``at_least`` 409s in all."""

    async def hold() -> None:
        deadline = time.monotonic() + HOLD_LIMIT
        while time.monotonic() < deadline:
            if (await scrape_outcomes(admin_urls))["conflict"] >= at_least:
                return
            await asyncio.sleep(POLL_STEP)

    return hold


# --- what a client saw, attempt by attempt ---------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One answer a client received (a timed-out attempt has none)."""

    status: int
    replayed: bool
    key: str | None  # the Idempotency-Key the attempt carried


@contextmanager
def recorded_session() -> Iterator[tuple[requests.Session, list[Attempt]]]:
    """A ``requests.Session`` whose response hook lists every answer it receives."""
    attempts: list[Attempt] = []

    def record(response: requests.Response, *_: object, **__: object) -> None:
        key = response.request.headers.get("Idempotency-Key")
        assert key is None or isinstance(key, str)
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        attempts.append(Attempt(response.status_code, replayed, key))

    with requests.Session() as session:
        session.hooks["response"].append(record)
        yield session, attempts


def stripe_client(
    proxy_url: str, session: requests.Session, *, timeout: float, retries: int
) -> stripe.StripeClient:
    """The SDK as an integration sets it up, its API base pointed at the proxy."""
    return stripe.StripeClient(
        "sk_test_idemproxy",
        base_addresses={"api": proxy_url},
        max_network_retries=retries,
        http_client=stripe.RequestsClient(timeout=timeout, session=session),
    )


# --- the Stripe SDK --------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_stripe_sdk_retries_a_timed_out_charge_and_gets_the_charge_the_upstream_made(
    make_proxy: ProxyFactory, upstream: StripeUpstream, store_url: str
) -> None:
    """The first attempt's answer comes after the SDK's 1 s timeout; the SDK retries with the
    key it generated, meets the execution in flight (409, which it retries), then the replay."""
    proxy = await make_proxy("", store=store_url)
    upstream.hold = until_conflicts([proxy.admin_url], at_least=1)
    with recorded_session() as (session, attempts):
        client = stripe_client(proxy.url, session, timeout=1.0, retries=5)
        charge = await asyncio.to_thread(client.v1.charges.create, CHARGE_PARAMS)

    assert upstream.count("/v1/charges") == 1
    made = json.loads(upstream.answers[0])
    assert charge.id == made["id"]
    assert (charge.amount, charge.currency, charge.status) == (1000, "eur", "succeeded")
    generated_key = upstream.calls[0].headers["Idempotency-Key"]
    # The timed-out first attempt left no answer; then one or more 409s, and the replay last.
    assert [a.status for a in attempts][-1] == 200
    assert {a.status for a in attempts[:-1]} == {409}
    assert attempts[-1].replayed
    assert {a.key for a in attempts} == {generated_key}
    assert charge.last_response is not None
    assert charge.last_response.idempotency_key == generated_key
    counted = await scrape_outcomes([proxy.admin_url])
    assert (counted["new"], counted["replayed"]) == (1, 1)
    assert counted["conflict"] == len(attempts) - 1 >= 1


@pytest.mark.timeout(30)
async def test_stripe_sdk_gets_the_stored_500_on_every_retry_and_the_charge_ran_once(
    make_proxy: ProxyFactory, upstream: StripeUpstream, store_url: str
) -> None:
    """A 500 is stored and replayed (SPEC 4, as Stripe does). The SDK retries every 5xx unless
    ``Stripe-Should-Retry: false`` says not to, so it spends all its retries on replays and
    raises the upstream's error; the request ran once."""
    proxy = await make_proxy("", store=store_url)
    upstream.failures = [500]
    retries = 2
    with recorded_session() as (session, attempts):
        client = stripe_client(proxy.url, session, timeout=10.0, retries=retries)
        with pytest.raises(stripe.APIError) as raised:
            await asyncio.to_thread(client.v1.charges.create, CHARGE_PARAMS)

    assert upstream.count("/v1/charges") == 1
    assert raised.value.http_status == 500
    assert raised.value.user_message == "the card network timed out"
    assert raised.value.http_body == upstream.answers[0].decode()
    assert [(a.status, a.replayed) for a in attempts] == [
        (500, False),
        *[(500, True)] * retries,
    ]
    assert len({a.key for a in attempts}) == 1
    counted = await scrape_outcomes([proxy.admin_url])
    assert (counted["new"], counted["replayed"]) == (1, retries)


@pytest.mark.timeout(30)
async def test_stripe_sdk_retry_after_a_released_503_runs_again_and_gets_a_charge(
    make_proxy: ProxyFactory, upstream: StripeUpstream
) -> None:
    """The contrast with the 500: 503 is a release status (SPEC 4), not stored, so the SDK's
    retry with the same key is a new execution, and that one makes the charge."""
    proxy = await make_proxy("")
    upstream.failures = [503]
    with recorded_session() as (session, attempts):
        client = stripe_client(proxy.url, session, timeout=10.0, retries=2)
        charge = await asyncio.to_thread(client.v1.charges.create, CHARGE_PARAMS)

    assert upstream.count("/v1/charges") == 2
    assert charge.id == json.loads(upstream.answers[1])["id"]
    assert [(a.status, a.replayed) for a in attempts] == [(503, False), (200, False)]
    assert len({a.key for a in attempts}) == 1
    counted = await scrape_outcomes([proxy.admin_url])
    assert (counted["released"], counted["new"], counted["replayed"]) == (1, 1, 0)


@pytest.mark.timeout(30)
async def test_stripe_sdk_two_concurrent_callers_with_one_idempotency_key_make_one_charge(
    make_proxy: ProxyFactory, upstream: StripeUpstream, store_url: str
) -> None:
    """Two callers send the same ``idempotency_key`` at once, each through its own client with
    retries: the execution waits until one of them got a 409, and both end with that charge."""
    proxy = await make_proxy("", store=store_url)
    upstream.hold = until_conflicts([proxy.admin_url], at_least=1)
    key = f"order-{uuid.uuid4().hex}"

    def create_charge() -> tuple[stripe.Charge, list[Attempt]]:
        with recorded_session() as (session, attempts):
            client = stripe_client(proxy.url, session, timeout=15.0, retries=5)
            options: stripe.RequestOptions = {"idempotency_key": key}
            return client.v1.charges.create(CHARGE_PARAMS, options), attempts

    async with asyncio.timeout(25):
        (first, first_attempts), (second, second_attempts) = await asyncio.gather(
            asyncio.to_thread(create_charge), asyncio.to_thread(create_charge)
        )

    assert upstream.count("/v1/charges") == 1
    assert upstream.calls[0].headers["Idempotency-Key"] == key
    assert first.id == second.id == json.loads(upstream.answers[0])["id"]
    finals = [first_attempts[-1], second_attempts[-1]]
    assert sorted(a.replayed for a in finals) == [False, True]
    assert all(a.status == 200 for a in finals)
    conflicts = [a for a in first_attempts + second_attempts if a.status == 409]
    assert conflicts
    assert {a.key for a in first_attempts + second_attempts} == {key}
    counted = await scrape_outcomes([proxy.admin_url])
    assert (counted["new"], counted["replayed"], counted["conflict"]) == (1, 1, len(conflicts))


# --- requests with urllib3's Retry -----------------------------------------------------------


def retrying_session() -> requests.Session:
    """``requests`` set up to retry POSTs, as the usual recipe has it."""
    retry = Retry(
        total=6,
        backoff_factor=0.2,
        status_forcelist=[409, 429, 502, 503, 504],
        allowed_methods=["GET", "POST"],
        respect_retry_after_header=True,
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


@dataclass
class Answer:
    """What a caller ended with, and why urllib3 retried before it (error name or status)."""

    status: int
    body: bytes
    replayed: bool
    retried_after: list[str | int | None]


def post_charge(session: requests.Session, url: str, key: str, read_timeout: float) -> Answer:
    response = session.post(
        url + "/v1/charges",
        data=CHARGE_FORM,
        headers={"Idempotency-Key": key, "Content-Type": "application/x-www-form-urlencoded"},
        timeout=(5, read_timeout),
    )
    history = response.raw.retries.history if response.raw.retries else ()
    return Answer(
        response.status_code,
        response.content,
        response.headers.get("Idempotent-Replayed") == "true",
        [(type(h.error).__name__ if h.error else h.status) for h in history],
    )


@pytest.mark.timeout(30)
async def test_urllib3_retry_after_a_read_timeout_gets_the_first_answer_once(
    make_proxy: ProxyFactory, upstream: StripeUpstream, redis_server: RedisProcess
) -> None:
    """The first execution outlasts the 1 s read timeout: urllib3 resends the POST at once,
    gets 409 with ``Retry-After: 1``, waits that second, and reads the replay."""
    proxy = await make_proxy("", store=redis_server.url)
    upstream.hold = until_conflicts([proxy.admin_url], at_least=1)
    key = f"urllib3-{uuid.uuid4().hex}"
    with retrying_session() as session:
        answer = await asyncio.to_thread(post_charge, session, proxy.url, key, 1.0)

    assert upstream.count("/v1/charges") == 1
    assert answer.status == 200
    assert answer.body == upstream.answers[0]
    assert answer.replayed
    assert answer.retried_after[0] == "ReadTimeoutError"
    assert set(answer.retried_after[1:]) == {409}
    counted = await scrape_outcomes([proxy.admin_url])
    assert (counted["new"], counted["replayed"]) == (1, 1)


STORM_CALLERS = 16


@pytest.fixture
async def two_proxy_processes(
    upstream: StripeUpstream, redis_server: RedisProcess, prefix: str, tmp_path: Path
) -> AsyncIterator[list[ProxyProcess]]:
    """Two ``idemproxy run`` processes in front of ``upstream``, sharing one Redis and prefix."""
    policy = f'shutdown_timeout: 2s\nstore: {{key_prefix: "{prefix}"}}\n'
    proxies = [ProxyProcess(policy, upstream.url, redis_server.url, tmp_path) for _ in range(2)]
    try:
        # start() blocks while it polls: in threads, so that this loop serves the upstream.
        await asyncio.gather(*(asyncio.to_thread(proxy.start) for proxy in proxies))
        yield proxies
    finally:
        await asyncio.gather(*(asyncio.to_thread(proxy.stop) for proxy in proxies))


def storm(urls: list[str], key: str) -> list[Answer]:
    """``STORM_CALLERS`` threads, each with its own retrying session, released together by a
    barrier, send the same keyed POST, to the ``urls`` in turn."""
    start_together = threading.Barrier(STORM_CALLERS)

    def caller(index: int) -> Answer:
        with retrying_session() as session:
            start_together.wait(timeout=10)
            return post_charge(session, urls[index % len(urls)], key, 15.0)

    with ThreadPoolExecutor(STORM_CALLERS) as pool:
        return list(pool.map(caller, range(STORM_CALLERS), timeout=30))


@pytest.mark.timeout(45)
async def test_urllib3_retry_storm_over_two_proxy_processes_runs_once_every_caller_same_bytes(
    upstream: StripeUpstream, two_proxy_processes: list[ProxyProcess]
) -> None:
    """16 callers, one key, two proxies on one Redis. The execution is held until every other
    caller has had its 409 (each proxy sees the other's lock), then all retry into the replay."""
    admin_urls = [f"http://{HOST}:{p.admin_port}" for p in two_proxy_processes]
    upstream.hold = until_conflicts(admin_urls, at_least=STORM_CALLERS - 1)
    urls = [f"http://{HOST}:{p.port}" for p in two_proxy_processes]
    key = f"storm-{uuid.uuid4().hex}"
    answers = await asyncio.to_thread(storm, urls, key)

    assert upstream.count("/v1/charges") == 1
    assert {(a.status, a.body) for a in answers} == {(200, upstream.answers[0])}
    assert sorted(a.replayed for a in answers) == [False] + [True] * (STORM_CALLERS - 1)
    retried = [a for a in answers if a.replayed]
    assert all(a.retried_after and set(a.retried_after) == {409} for a in retried)
    counted = await scrape_outcomes(admin_urls)
    assert (counted["new"], counted["replayed"]) == (1, STORM_CALLERS - 1)
    assert counted["conflict"] == sum(len(a.retried_after) for a in answers) >= STORM_CALLERS - 1
    for proxy in two_proxy_processes:  # one JSON line a request, none above INFO
        levels = Counter(json.loads(line)["level"] for line in proxy.log.read_text().splitlines())
        assert set(levels) == {"info"}, proxy.log.read_text()[-2000:]
