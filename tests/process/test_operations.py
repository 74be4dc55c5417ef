"""Operating idemproxy: metrics, the keys API and its CLI, JSON logs, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from idemproxy import observability
from idemproxy.observability import DirectAccessLog, JsonFormatter, Metrics, Trace
from tests.conftest import (
    HOST,
    ProxyFactory,
    RunningProxy,
    Upstream,
    free_port,
    idemproxy_argv,
    run_cli,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

TOKEN = "admin-token-for-tests-0123456789"
POLICY = f"""
admin:
  token: {TOKEN}
routes:
  - name: create-order
    match: {{methods: [POST], path: /orders}}
    key: {{required: true}}
  - match: {{methods: [POST], path: "/payments/{{id}}/capture"}}
"""


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def scrape(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(proxy.admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


async def test_metrics_count_outcomes_per_route_label(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(POLICY)
    headers = {"Idempotency-Key": "m-1"}
    for _ in range(2):
        async with http.post(proxy.url + "/orders", data=b"a", headers=headers):
            pass
    async with http.post(proxy.url + "/orders", data=b"b", headers=headers):
        pass
    async with http.post(proxy.url + "/orders", data=b"a"):
        pass
    for order in ("1", "2"):
        headers = {"Idempotency-Key": f"pay-{order}"}
        async with http.post(f"{proxy.url}/payments/{order}/capture", headers=headers):
            pass
    async with http.get(proxy.url + "/anything"):
        pass

    text = await scrape(http, proxy)
    counts = samples(text, "idemproxy_requests_total")
    assert counts[(("outcome", "new"), ("route", "create-order"))] == 1
    assert counts[(("outcome", "replayed"), ("route", "create-order"))] == 1
    assert counts[(("outcome", "mismatch"), ("route", "create-order"))] == 1
    assert counts[(("outcome", "missing_key"), ("route", "create-order"))] == 1
    # Raw paths never become labels: both captures count under the route's pattern.
    assert counts[(("outcome", "new"), ("route", "POST /payments/{id}/capture"))] == 2
    assert counts[(("outcome", "passthrough"), ("route", "unmatched"))] == 1
    assert not any("/payments/1" in value for key in counts for _, value in key)
    upstream_count = samples(text, "idemproxy_upstream_duration_seconds_count")
    assert upstream_count[(("route", "create-order"),)] == 1
    store_count = samples(text, "idemproxy_store_duration_seconds_count")
    assert store_count[(("operation", "acquire"),)] >= 5
    assert samples(text, "idemproxy_locks_in_flight")[()] == 0


async def test_locks_in_flight_counts_a_running_keyed_request(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(POLICY)
    slow = asyncio.create_task(
        http.post(
            proxy.url + "/orders",
            data=b"a",
            headers={"Idempotency-Key": "slow", "X-Test-Delay": "0.5"},
        )
    )
    for _ in range(50):
        if upstream.count():
            break
        await asyncio.sleep(0.02)
    text = await scrape(http, proxy)
    assert samples(text, "idemproxy_locks_in_flight")[()] == 1
    (await slow).release()


@pytest.fixture
async def admin(make_proxy: ProxyFactory, store_url: str) -> RunningProxy:
    """A proxy with the keys API enabled, on each store."""
    return await make_proxy(POLICY, store=store_url)


async def test_keys_api_rejects_a_missing_wrong_or_empty_token(
    admin: RunningProxy, http: aiohttp.ClientSession
) -> None:
    proxy = admin
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": TOKEN},
    ):
        for method in ("GET", "DELETE"):
            async with http.request(method, proxy.admin_url + "/keys/k", headers=headers) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await r.json())["code"] == "unauthorized"


async def test_keys_api_inspects_and_purges_a_key(
    admin: RunningProxy, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = admin
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = {"Idempotency-Key": "order-77", "Authorization": "Bearer alice"}
    async with http.post(proxy.url + "/orders", data=b"tea", headers=client) as response:
        body = await response.read()

    url = proxy.admin_url + "/keys/order-77"
    async with http.get(url, headers=auth) as response:
        assert response.status == 404  # the key lives in alice's scope, not the empty one
        assert (await response.json())["code"] == "key_not_found"
    scoped = url + "?scope=Bearer%20alice"
    async with http.get(scoped, headers=auth) as response:
        assert response.status == 200
        info = await response.json()
    assert info["state"] == "completed"
    assert info["status"] == 201
    assert 0 < info["expires_in_seconds"] <= 24 * 3600
    assert info["age_seconds"] >= 0
    assert "body_base64" not in info
    async with http.get(scoped + "&body=1", headers=auth) as response:
        full = await response.json()
    assert base64.b64decode(full["body_base64"]) == body

    async with http.delete(scoped, headers=auth) as response:
        assert response.status == 204
    async with http.delete(scoped, headers=auth) as response:
        assert response.status == 404
    # Purged: the same request runs again.
    async with http.post(proxy.url + "/orders", data=b"tea", headers=client) as response:
        assert "Idempotent-Replayed" not in response.headers
    assert upstream.count() == 2


async def test_keys_api_finds_and_purges_a_key_of_a_route_without_scope_headers(
    make_proxy: ProxyFactory, store_url: str, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """``scope: []`` keeps every client's keys in one namespace: no scope value at all, which
    is the empty scope as much as one empty value is. Found by hand: such keys answered 404
    whatever ``scope`` was sent, so they could be neither inspected nor purged."""
    policy = POLICY + "  - match: {methods: [POST], path: /shared}\n    scope: []\n"
    proxy = await make_proxy(policy, store=store_url)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = {"Idempotency-Key": "shared-1", "Authorization": "Bearer alice"}
    async with http.post(proxy.url + "/shared", data=b"x", headers=client) as response:
        assert response.status == 201

    url = proxy.admin_url + "/keys/shared-1"
    async with http.get(url, headers=auth) as response:
        assert response.status == 200
        assert (await response.json())["state"] == "completed"
    async with http.get(url + "?scope=Bearer%20alice", headers=auth) as response:
        assert response.status == 404  # not alice's: the route keeps no credential namespace
    async with http.delete(url, headers=auth) as response:
        assert response.status == 204
    async with http.get(url, headers=auth) as response:
        assert response.status == 404
    async with http.post(proxy.url + "/shared", data=b"x", headers=client) as response:
        assert "Idempotent-Replayed" not in response.headers  # purged: it runs again
    assert upstream.count("/shared") == 2


async def test_keys_api_takes_a_key_in_the_ietf_quoted_form_as_the_header_does(
    admin: RunningProxy, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """``Idempotency-Key: "abc"`` and ``abc`` name the same key (SPEC 4), for the keys API too.
    Found by hand: GET /keys/%22abc%22 answered 404 for the key a client sent as ``"abc"``."""
    proxy = admin
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = {"Idempotency-Key": '"order-78"'}
    async with http.post(proxy.url + "/orders", data=b"tea", headers=client) as response:
        assert response.status == 201
    bare = proxy.admin_url + "/keys/order-78"
    quoted = proxy.admin_url + "/keys/%22order-78%22"
    async with http.get(bare, headers=auth) as response:
        assert response.status == 200
        key_hash = (await response.json())["key_hash"]
    async with http.get(quoted, headers=auth) as response:
        assert response.status == 200
        assert (await response.json())["key_hash"] == key_hash
    async with http.delete(quoted, headers=auth) as response:
        assert response.status == 204
    async with http.get(bare, headers=auth) as response:
        assert response.status == 404
    assert upstream.count("/orders") == 1


async def test_keys_api_is_disabled_without_a_token(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy("")
    async with http.get(proxy.admin_url + "/keys/k") as response:
        assert response.status == 404
        assert (await response.json())["code"] == "keys_api_disabled"


async def test_keys_cli_gets_and_deletes(admin: RunningProxy, http: aiohttp.ClientSession) -> None:
    proxy = admin
    async with http.post(proxy.url + "/orders", data=b"x", headers={"Idempotency-Key": "cli-1"}):
        pass
    env = {"IDEMPROXY_ADMIN_TOKEN": TOKEN}

    def cli(*args: str, token: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return run_cli("keys", *args, "--admin", proxy.admin_url, env=token)

    got = await asyncio.to_thread(cli, "get", "cli-1")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["state"] == "completed"
    wrong = await asyncio.to_thread(cli, "get", "cli-1", token={"IDEMPROXY_ADMIN_TOKEN": "nope"})
    assert wrong.returncode == 2
    assert "401" in wrong.stderr
    deleted = await asyncio.to_thread(cli, "delete", "cli-1")
    assert deleted.returncode == 0
    missing = await asyncio.to_thread(cli, "get", "cli-1")
    assert missing.returncode == 1


async def test_keys_cli_exits_1_only_for_an_unknown_key_not_for_any_404(
    make_proxy: ProxyFactory,
) -> None:
    """README: 1 for an unknown key, 2 otherwise. Every 404 was taken for "no such key" (found
    by hand against a real ``idemproxy run`` with the keys API off): that, or an ``--admin``
    URL with a wrong path, exited 1."""
    proxy = await make_proxy()  # no admin token: the keys API is off
    env = {"IDEMPROXY_ADMIN_TOKEN": TOKEN}
    for where in (proxy.admin_url, proxy.admin_url + "/wrong/prefix"):
        result = await asyncio.to_thread(run_cli, "keys", "get", "cli-1", "--admin", where, env=env)
        assert (result.returncode, "404" in result.stderr) == (2, True), (where, result.stderr)


async def a_web_page(request: web.Request) -> web.Response:
    return web.Response(text="<html>hello</html>", content_type="text/html")


async def test_keys_cli_pointed_at_some_other_server_exits_2_without_a_traceback() -> None:
    """A 200 that is not the admin API's JSON (an ``--admin`` naming a web server) ended the
    CLI in a JSONDecodeError traceback (found by hand against ``python -m http.server``)."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", a_web_page)
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server()
    try:
        result = await asyncio.to_thread(
            run_cli,
            "keys",
            "get",
            "k",
            "--admin",
            f"http://{HOST}:{server.port}",
            env={"IDEMPROXY_ADMIN_TOKEN": TOKEN},
        )
    finally:
        await server.close()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


async def test_access_log_is_json_without_raw_keys_bodies_or_credentials(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await make_proxy(POLICY)
    secret_key = "very-secret-key-4711"
    headers = {"Idempotency-Key": secret_key, "Authorization": "Bearer top-secret-credential"}
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            async with http.post(
                proxy.url + "/orders?card=4242", data=b"secret-body-text", headers=headers
            ):
                pass
    records = [r for r in caplog.records if r.name == "idemproxy.access"]
    assert len(records) == 2
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    assert [line["outcome"] for line in lines] == ["new", "replayed"]
    for line in lines:
        assert {"time", "method", "path", "route", "outcome", "status", "duration_ms"} <= set(line)
        assert line["path"] == "/orders"
        assert line["status"] == 201
        assert len(line["key_hash"]) == 64
    # Everything idemproxy logged (the upstream fixture's own access log is not ours).
    ours = [r for r in caplog.records if r.name.startswith("idemproxy")]
    everything = "\n".join(JsonFormatter().format(r) for r in ours)
    for secret in (secret_key, "top-secret-credential", "secret-body-text", "4242"):
        assert secret not in everything


def _start(policy: Path, upstream_url: str, listen: int, admin: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        idemproxy_argv(
            "run",
            "-c",
            str(policy),
            "--upstream",
            upstream_url,
            "--listen",
            f"{HOST}:{listen}",
            "--admin",
            f"{HOST}:{admin}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )


async def _wait_healthy(http: aiohttp.ClientSession, admin_port: int) -> None:
    for _ in range(100):
        try:
            async with http.get(f"http://{HOST}:{admin_port}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the proxy did not become healthy")


async def test_sighup_reloads_a_good_policy_and_keeps_the_old_one_on_a_bad_one(
    tmp_path: Path, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("routes:\n  - match: {methods: [POST], path: /orders}\n")
    listen, admin_port = free_port(), free_port()
    process = _start(policy, upstream.url, listen, admin_port)
    base = f"http://{HOST}:{listen}"

    async def status_without_key(path: str) -> int:
        async with http.post(base + path, data=b"x") as response:
            return response.status

    try:
        await _wait_healthy(http, admin_port)
        assert await status_without_key("/orders") == 201  # key optional

        policy.write_text(
            "routes:\n  - match: {methods: [POST], path: /orders}\n    key: {required: true}\n"
        )
        process.send_signal(signal.SIGHUP)
        for _ in range(50):
            if await status_without_key("/orders") == 400:
                break
            await asyncio.sleep(0.1)
        assert await status_without_key("/orders") == 400

        policy.write_text("routes:\n  - match: {methods: [POST], path: orders}\n    ttl: 3x\n")
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert process.poll() is None
        assert await status_without_key("/orders") == 400  # the old policy keeps serving
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=15)
    assert process.returncode == 0
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [e["message"] for e in events]
    assert "policy reloaded" in messages
    refused = [e for e in events if e["message"].startswith("reload refused")]
    assert len(refused) == 1
    assert any("routes[0].ttl" in p for p in refused[0]["problems"])
    assert messages[-1] == "idemproxy stopped"


def test_text_log_format_is_for_humans() -> None:
    result = run_cli(
        "run", "--upstream", "http://127.0.0.1:1", "--listen", "bad", "--log-format", "text"
    )
    assert result.returncode == 1
    assert "--listen" in result.stderr


async def test_a_running_proxy_writes_every_access_line_to_stderr_as_json(
    tmp_path: Path, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """``run`` writes access lines directly (not via logging): same JSON, none lost at stop."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    listen, admin_port = free_port(), free_port()
    process = _start(policy, upstream.url, listen, admin_port)
    headers = {"Idempotency-Key": "stderr-secret-key", "Authorization": "Bearer stderr-credential"}
    try:
        await _wait_healthy(http, admin_port)
        for _ in range(2):
            async with http.post(
                f"http://{HOST}:{listen}/orders", data=b"stderr-body", headers=headers
            ):
                pass
        sent = [http.get(f"http://{HOST}:{listen}/items/{n}") for n in range(20)]
        for response in await asyncio.gather(*sent):
            response.release()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=15)
    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "idemproxy.access"]
    assert [line["outcome"] for line in access[:2]] == ["new", "replayed"]
    assert sorted(line["path"] for line in access[2:]) == sorted(f"/items/{n}" for n in range(20))
    for line in access:
        assert {"time", "level", "message", "method", "route", "status", "duration_ms"} <= set(line)
        assert line["time"].endswith("Z")
    assert len(access[0]["key_hash"]) == 64
    for secret in ("stderr-secret-key", "stderr-credential", "stderr-body"):
        assert secret not in stderr


def test_the_access_loggers_level_rules_the_direct_writer_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.BytesIO()
    monkeypatch.setattr(observability, "_direct_access_log", DirectAccessLog(stream))
    access = logging.getLogger("idemproxy.access")
    level = access.level
    try:
        access.setLevel(logging.INFO)
        Trace("GET", "/seen", time.monotonic()).finish(Metrics(), 200)  # no loop: written at once
        access.setLevel(logging.WARNING)
        Trace("GET", "/silenced", time.monotonic()).finish(Metrics(), 200)
    finally:
        access.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["path"] for line in lines] == ["/seen"]
    assert lines[0]["logger"] == "idemproxy.access"


class WriteRecorder(io.BytesIO):
    """A byte stream that also keeps what each write() got."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: ReadableBuffer, /) -> int:
        self.writes.append(bytes(data))
        return super().write(data)


async def test_access_lines_reach_stderr_in_whole_line_writes_a_pipe_keeps_atomic() -> None:
    """With --workers every process writes to one stderr, often a pipe, where only a write of
    up to PIPE_BUF bytes is atomic. Found by hand: ``idemproxy run --workers 2`` under 6000
    requests, its stderr pipe read slowly, wrote 194 lines that were two workers' lines
    interleaved mid-line, as one write carried up to 256 lines."""
    stream = WriteRecorder()
    log = DirectAccessLog(stream, select.PIPE_BUF)  # as a worker's (supervisor._worker_main)
    for n in range(1000):  # in a running loop: batches of up to 256 lines
        log.write(Trace("GET", f"/items/{n}", time.monotonic()), 200, 0.001)
    log.flush()
    assert len(stream.writes) > 1
    for data in stream.writes:
        assert len(data) <= select.PIPE_BUF
        assert data.endswith(b"\n")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["path"] for line in lines] == [f"/items/{n}" for n in range(1000)]
    # One process alone on its stderr: all waiting lines in one write (a syscall a batch).
    alone = WriteRecorder()
    single = DirectAccessLog(alone)
    for n in range(10):
        single.write(Trace("GET", f"/items/{n}", time.monotonic()), 200, 0.001)
    single.flush()
    assert len(alone.writes) == 1
    assert len(alone.getvalue().splitlines()) == 10
