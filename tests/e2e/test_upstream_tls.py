"""An https:// upstream: the lean client speaks TLS and verifies the upstream's certificate.

The certificate comes from a throwaway CA (trustme). The proxy trusts what the process trusts:
``SSL_CERT_FILE`` names the CA here, as an operator would for a private CA.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from tests.conftest import HOST, RunningProxy, free_port

POLICY = "routes:\n  - match: {methods: [POST], path: /orders}\n    key: {required: true}\n"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https_upstream(ca: trustme.CA) -> AsyncIterator[tuple[str, list[str]]]:
    """An aiohttp server on https://127.0.0.1:PORT; the list records the paths it served."""
    served: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        served.append(request.path)
        return web.Response(status=201, body=b'{"n": %d}' % len(served))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port, ssl_context=context).start()
    yield f"https://{HOST}:{port}", served
    await runner.cleanup()


async def start_proxy(upstream_url: str) -> ProxyServer:
    config = load_text(
        POLICY,
        flags=Overrides(listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=upstream_url),
    )
    server = ProxyServer(config)
    await server.start()
    return server


async def test_keyed_and_passthrough_requests_reach_an_https_upstream(
    ca: trustme.CA,
    https_upstream: tuple[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    url, served = https_upstream
    server = await start_proxy(url)
    try:
        base = RunningProxy(server).url
        answers = []
        for _ in range(2):
            headers = {"Idempotency-Key": "tls-1"}
            async with http.post(base + "/orders", data=b"x", headers=headers) as response:
                answers.append((response.status, await response.read(), response.headers))
        assert [(status, body) for status, body, _ in answers] == [(201, b'{"n": 1}')] * 2
        assert answers[1][2]["Idempotent-Replayed"] == "true"
        async with http.get(base + "/items/1") as response:  # pass-through, same client
            assert response.status == 201
            assert await response.read() == b'{"n": 2}'
    finally:
        await server.stop()
    assert served == ["/orders", "/items/1"]


async def test_an_untrusted_upstream_certificate_is_a_502_and_nothing_ran(
    https_upstream: tuple[str, list[str]], http: aiohttp.ClientSession
) -> None:
    url, served = https_upstream  # signed by a CA nobody trusts here
    server = await start_proxy(url)
    try:
        base = RunningProxy(server).url
        headers = {"Idempotency-Key": "tls-untrusted"}
        for _ in range(2):  # the lease was released: the retry is tried again, not replayed
            async with http.post(base + "/orders", data=b"x", headers=headers) as response:
                assert response.status == 502
                assert (await response.json())["code"] == "upstream_unavailable"
                assert "Idempotent-Replayed" not in response.headers
    finally:
        await server.stop()
    assert served == []
