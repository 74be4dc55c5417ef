"""The admin listener (SPEC section 6) and the process lifecycle (SPEC section 2).

/healthz and /readyz on their own port, /readyz following a real Redis down and back up without
a proxy restart, and a real ``python -m idemproxy run`` process that drains an in-flight request
on SIGTERM and exits 0 on SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import HOST, ProxyFactory, RedisProcess, Upstream, free_port

BOUND = 15.0  # seconds: the upper bound of every wait in this file (never an assertion)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


async def get_status(http: aiohttp.ClientSession, url: str) -> int | None:
    """The status ``url`` answers with, or None when it does not answer."""
    try:
        async with http.get(url, timeout=PROBE_TIMEOUT) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_for_status(http: aiohttp.ClientSession, url: str, wanted: int) -> None:
    """Poll ``url`` until it answers ``wanted``; fail after ``BOUND`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    seen: list[int | None] = []
    while loop.time() < deadline:
        status = await get_status(http, url)
        if status == wanted:
            return
        if not seen or seen[-1] != status:
            seen.append(status)
        await asyncio.sleep(0.1)
    pytest.fail(f"{url} did not answer {wanted} within {BOUND} s; it answered {seen}")


# --- health and readiness ------------------------------------------------------------------------


async def test_healthz_answers_200_from_the_admin_listener(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy()
    async with http.get(proxy.admin_url + "/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    assert upstream.count() == 0


async def test_readyz_answers_200_when_the_store_answers(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession, store_url: str
) -> None:
    proxy = await make_proxy(store=store_url)
    async with http.get(proxy.admin_url + "/readyz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ready"


async def test_readyz_is_503_while_healthz_stays_200_when_redis_is_unreachable(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(store=f"redis://{HOST}:{free_port()}/0")  # nothing listens there
    async with http.get(proxy.admin_url + "/readyz", timeout=PROBE_TIMEOUT) as response:
        assert response.status == 503
        assert (await response.json())["status"] != "ready"
    async with http.get(proxy.admin_url + "/healthz", timeout=PROBE_TIMEOUT) as response:
        assert response.status == 200


async def test_readyz_follows_redis_down_and_back_up_without_a_restart(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    redis = RedisProcess(free_port(), str(tmp_path))  # a private server: this test kills it
    redis.start()
    try:
        proxy = await make_proxy(store=redis.url)
        ready = proxy.admin_url + "/readyz"
        await wait_for_status(http, ready, 200)

        assert redis.process is not None
        redis.process.kill()
        await asyncio.to_thread(redis.process.wait, BOUND)
        redis.process = None
        await wait_for_status(http, ready, 503)
        # Liveness does not follow the store: the process is fine, only not ready.
        assert await get_status(http, proxy.admin_url + "/healthz") == 200

        redis.start()  # the same port, a fresh and empty server
        await wait_for_status(http, ready, 200)

        # The same proxy serves keyed requests through the returned store again.
        headers = {"Idempotency-Key": "after-restart"}
        replayed = []
        for _ in range(2):
            async with http.post(proxy.url + "/orders", data=b"x", headers=headers) as response:
                assert response.status == 201
                replayed.append(response.headers.get("Idempotent-Replayed"))
        assert replayed == [None, "true"]
        assert upstream.count("/orders") == 1
    finally:
        redis.stop()


# --- a port of its own ---------------------------------------------------------------------------


async def test_admin_listens_on_its_own_port_and_the_proxy_port_forwards_admin_paths(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy()
    assert proxy.server.address[1] != proxy.server.admin_address[1]

    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(proxy.url + path) as response:
            assert response.status == 201  # the upstream's answer, not the admin's
            assert response.headers["X-Serial"] == str(upstream.count())
        assert upstream.count(path) == 1

    calls = upstream.count()
    async with http.get(proxy.admin_url + "/healthz") as response:
        assert response.status == 200
        assert "X-Serial" not in response.headers
    async with http.get(proxy.admin_url + "/orders") as response:
        assert response.status == 404  # the admin listener proxies nothing
    assert upstream.count() == calls


async def test_an_unknown_admin_path_or_method_is_a_problem_like_every_other_answer(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """README: every answer idemproxy makes itself is problem+json. The admin listener answered
    an unknown path and a wrong method with aiohttp's text/plain (found by hand: curl of
    /nope and POST /healthz on a real ``idemproxy run``)."""
    proxy = await make_proxy()
    async with http.get(proxy.admin_url + "/nope") as response:
        assert (response.status, response.content_type) == (404, "application/problem+json")
        assert (await response.json())["code"] == "not_found"
    async with http.post(proxy.admin_url + "/healthz") as response:
        assert (response.status, response.content_type) == (405, "application/problem+json")
        assert (await response.json())["code"] == "method_not_allowed"
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}


# --- a real process: graceful shutdown -----------------------------------------------------------


@contextlib.asynccontextmanager
async def idemproxy_process(
    upstream_url: str, listen: int, admin: int
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {k: v for k, v in os.environ.items() if k != "IDEMPROXY_CONFIG"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "idemproxy",
        "run",
        "--upstream",
        upstream_url,
        "--listen",
        f"{HOST}:{listen}",
        "--admin",
        f"{HOST}:{admin}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


async def wait_healthy(
    http: aiohttp.ClientSession, process: asyncio.subprocess.Process, admin: int
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while loop.time() < deadline:
        if process.returncode is not None:
            pytest.fail(f"idemproxy exited early with {process.returncode}")
        if await get_status(http, f"http://{HOST}:{admin}/healthz") == 200:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"idemproxy did not answer /healthz within {BOUND} s")


async def wait_refused(port: int) -> None:
    """Wait until nothing accepts connections on ``port`` any more."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
        except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
            # reset: the attempt sat in the accept queue of the listener that just closed
            return
        writer.close()
        with contextlib.suppress(ConnectionError):  # reset: the listener closed meanwhile
            await writer.wait_closed()
        await asyncio.sleep(0.05)
    pytest.fail(f"port {port} still accepted connections {BOUND} s after the signal")


async def finish(process: asyncio.subprocess.Process) -> str:
    """Wait (bounded) for the process to exit; its stderr."""
    assert process.stderr is not None
    stderr = await asyncio.wait_for(process.stderr.read(), BOUND)
    await asyncio.wait_for(process.wait(), BOUND)
    return stderr.decode(errors="replace")


async def test_sigterm_lets_an_in_flight_keyed_request_finish_and_exits_0(
    http: aiohttp.ClientSession,
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        body = await request.read()
        arrived.set()
        # A slow upstream: it holds its answer until the test has seen the proxy begin to
        # shut down, so the signal surely arrives while the request is in flight.
        await asyncio.wait_for(release.wait(), BOUND)
        return web.Response(status=201, body=b"created:" + body, headers={"Location": "/orders/1"})

    app = web.Application()
    app.router.add_post("/orders", slow)
    upstream = TestServer(app, host=HOST, port=free_port())
    await upstream.start_server()
    listen, admin = free_port(), free_port()
    try:
        async with idemproxy_process(f"http://{HOST}:{upstream.port}", listen, admin) as proc:
            await wait_healthy(http, proc, admin)

            headers = {"Idempotency-Key": "drain-1"}
            in_flight = asyncio.create_task(
                http.post(
                    f"http://{HOST}:{listen}/orders",
                    data=b"order-1",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=BOUND * 2),
                )
            )
            try:
                await asyncio.wait_for(arrived.wait(), BOUND)
                proc.send_signal(signal.SIGTERM)
                # Shutdown has begun (no new connections) while the request is still running.
                await wait_refused(listen)
                assert proc.returncode is None
                assert not in_flight.done()
                release.set()
                response = await asyncio.wait_for(in_flight, BOUND)
            finally:
                release.set()
                if not in_flight.done():
                    in_flight.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await in_flight
            async with response:
                assert response.status == 201
                assert await response.read() == b"created:order-1"
                assert response.headers["Location"] == "/orders/1"

            stderr = await finish(proc)
            assert proc.returncode == 0, stderr
            assert "Traceback" not in stderr
            assert '"idemproxy stopped"' in stderr
    finally:
        await upstream.close()


async def test_sigint_exits_0(upstream: Upstream, http: aiohttp.ClientSession) -> None:
    listen, admin = free_port(), free_port()
    async with idemproxy_process(upstream.url, listen, admin) as proc:
        await wait_healthy(http, proc, admin)
        async with http.get(f"http://{HOST}:{listen}/ping") as response:
            assert response.status == 201
        proc.send_signal(signal.SIGINT)
        stderr = await finish(proc)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert "KeyboardInterrupt" not in stderr
        assert '"idemproxy stopped"' in stderr
