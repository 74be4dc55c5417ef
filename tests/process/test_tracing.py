"""OpenTelemetry tracing (SPEC section 6, README "Tracing"), end to end with real processes.

Everything here is real and on 127.0.0.1: an OTLP/HTTP receiver the test starts (an aiohttp
server taking POST /v1/traces and decoding the protobuf with opentelemetry-proto), an upstream
that records the ``traceparent`` it receives, and ``python -m idemproxy run`` as a child
process, stopped by its PID. Every wait polls a condition within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from idemproxy.config import ConfigError, load_text
from idemproxy.config import resolve as config_module
from idemproxy.settings import TracingConfig
from idemproxy.tracing import NOOP, start_tracing
from tests.conftest import HOST, RedisProcess, free_port

SERVER, CLIENT, INTERNAL = (
    ProtoSpan.SPAN_KIND_SERVER,
    ProtoSpan.SPAN_KIND_CLIENT,
    ProtoSpan.SPAN_KIND_INTERNAL,
)
RAW_KEY = "raw-key-never-exported-7f3c"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
WAIT = 15.0  # seconds: the bound of every poll (spans are exported every 50 ms here)


# --- the OTLP/HTTP receiver ----------------------------------------------------------------


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


@dataclass
class ExportedSpan:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int


@dataclass
class Collector:
    """A real OTLP/HTTP receiver: every span it was sent, decoded, and the raw requests."""

    spans: list[ExportedSpan] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ExportedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            resource=resource,
                            status_code=span.status.code,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def trace(self, trace_id: str) -> list[ExportedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    async def wait_for(self, done: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not done():
            if loop.time() > deadline:
                names = [(s.trace_id[:8], s.name) for s in self.spans]
                pytest.fail(f"the collector did not receive {what} within {WAIT}s: {names}")
            await asyncio.sleep(0.02)

    async def wait_for_trace(self, trace_id: str, names: set[str]) -> list[ExportedSpan]:
        await self.wait_for(
            lambda: names <= {s.name for s in self.trace(trace_id)}, f"{names} of {trace_id}"
        )
        return self.trace(trace_id)


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    receiver = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.receive)
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server()
    receiver.port = server.port or 0
    yield receiver
    await server.close()


# --- the upstream --------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]  # as sent, duplicates kept

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name]

    def traceparent(self) -> tuple[str, str, str]:
        (value,) = self.all("traceparent")  # exactly one: the client's was replaced
        match = TRACEPARENT.match(value)
        assert match is not None, value
        return match.group(1), match.group(2), match.group(3)


@dataclass
class TracedUpstream:
    """A real upstream that records each request's headers as they arrived.

    ``X-Test-Status`` picks the status, ``X-Test-Delay`` delays the answer, ``/drop`` closes
    the connection without answering; a GET answers with ``ETag: "v1"``; ``/ws`` is a
    WebSocket echo."""

    received: list[Received] = field(default_factory=list)
    url: str = ""

    def calls(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = [(k.decode(), v.decode()) for k, v in request.raw_headers]
        self.received.append(Received(request.method, request.path, headers))
        if request.path == "/ws":
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            async for message in socket:
                await socket.send_str(message.data)
            return socket
        await request.read()
        if request.path == "/drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        await asyncio.sleep(float(request.headers.get("X-Test-Delay", "0")))
        if request.method == "GET":
            return web.Response(status=200, body=b"{}", headers={"ETag": '"v1"'})
        status = int(request.headers.get("X-Test-Status", "201"))
        return web.Response(status=status, body=b'{"ok": true}', content_type="application/json")


@pytest.fixture
async def traced_upstream() -> AsyncIterator[TracedUpstream]:
    recorder = TracedUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server()
    recorder.url = f"http://{HOST}:{server.port}"
    yield recorder
    await server.close()


# --- the proxy as a real process -----------------------------------------------------------


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment without any OTEL_* or idemproxy setting of its own."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "IDEMPROXY_CONFIG"
    }
    return {**env, "OTEL_BSP_SCHEDULE_DELAY": "50", **extra}


@dataclass
class ProxyProcess:
    process: asyncio.subprocess.Process
    url: str
    stderr_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.stderr_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def access_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("logger") == "idemproxy.access"]

    async def terminate(self, bound: float = 20.0) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the process took to exit (at most ``bound``)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), bound)
        except TimeoutError:
            pytest.fail(f"idemproxy did not exit within {bound}s of SIGTERM")
        return code, loop.time() - started


@contextlib.asynccontextmanager
async def run_proxy(
    tmp_path: Path,
    upstream: str,
    policy: str = "",
    env: dict[str, str] | None = None,
    *flags: str,
) -> AsyncIterator[ProxyProcess]:
    """``idemproxy run`` with ``policy`` in front of ``upstream``, ready to take requests."""
    policy_file = tmp_path / f"policy-{free_port()}.yaml"
    policy_file.write_text(textwrap.dedent(policy))
    listen, admin = free_port(), free_port()
    stderr_path = policy_file.with_suffix(".log")
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "idemproxy", "run", "-c", str(policy_file)),
            *("--upstream", upstream, "--listen", f"{HOST}:{listen}"),
            *("--admin", f"{HOST}:{admin}", *flags),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            env=_environment(**(env or {})),
        )
    proxy = ProxyProcess(process, f"http://{HOST}:{listen}", stderr_path)
    try:
        await _wait_healthy(proxy, f"http://{HOST}:{admin}/healthz")
        yield proxy
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _wait_healthy(proxy: ProxyProcess, url: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            if proxy.process.returncode is not None:
                pytest.fail(f"idemproxy exited early: {proxy.stderr_path.read_text()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    pytest.fail(f"idemproxy did not answer /healthz within {WAIT}s")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def traceparent(trace_id: str, parent_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}"


def ids(n: int) -> tuple[str, str]:
    """A made-up client trace id and parent span id, distinct per ``n``."""
    return f"{n:032x}".replace("0", "a", 4), f"{n:016x}".replace("0", "b", 2)


def only(spans: list[ExportedSpan], **match: Any) -> ExportedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.name, s.kind) for s in spans])
    return found[0]


KEYED_POLICY = """
    shutdown_timeout: 5s
    tracing:
      endpoint: {endpoint}
      service_name: orders-idemproxy
    routes:
      - name: create-order
        match: {{methods: [POST], path: /orders}}
        key: {{required: true}}
      - name: slow
        match: {{methods: [POST], path: /slow}}
        concurrency: wait
      - match: {{methods: [POST], path: /drop}}
      - match: {{methods: [PATCH], path: "/articles/{{id}}"}}
        etag_from_get: true
"""


# --- the span tree -------------------------------------------------------------------------


async def test_new_key_and_replay_span_tree_parentage_and_logs(
    tmp_path: Path,
    collector: Collector,
    traced_upstream: TracedUpstream,
    http: aiohttp.ClientSession,
) -> None:
    policy = KEYED_POLICY.format(endpoint=collector.endpoint)
    first_trace, first_parent = ids(1)
    replay_trace, replay_parent = ids(2)
    async with run_proxy(tmp_path, traced_upstream.url, policy) as proxy:
        headers = {
            "Idempotency-Key": RAW_KEY,
            "traceparent": traceparent(first_trace, first_parent),
            "tracestate": "vendor=opaque",
        }
        async with http.post(f"{proxy.url}/orders", data=b'{"sku": "tea"}', headers=headers) as r:
            assert r.status == 201
            first_body = await r.read()
        headers["traceparent"] = traceparent(replay_trace, replay_parent)
        async with http.post(f"{proxy.url}/orders", data=b'{"sku": "tea"}', headers=headers) as r:
            assert r.status == 201
            assert r.headers["Idempotent-Replayed"] == "true"
            assert await r.read() == first_body

        first = await collector.wait_for_trace(
            first_trace, {"POST /orders", "store.acquire", "store.complete", "POST"}
        )
        replay = await collector.wait_for_trace(replay_trace, {"POST /orders", "store.acquire"})
        code, _ = await proxy.terminate()
        assert code == 0

    # The new key: a server span continuing the client's trace, store spans and one upstream
    # client span under it.
    server = only(first, kind=SERVER)
    assert server.name == "POST /orders"
    assert server.parent_id == first_parent
    assert server.resource["service.name"] == "orders-idemproxy"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["url.path"] == "/orders"
    assert server.attributes["http.route"] == "/orders"
    assert server.attributes["http.response.status_code"] == 201
    assert server.attributes["idemproxy.route"] == "create-order"
    assert server.attributes["idemproxy.outcome"] == "new"
    assert server.attributes["idemproxy.replayed"] is False
    key_hash = server.attributes["idemproxy.key_hash"]
    assert re.fullmatch(r"[0-9a-f]{64}", key_hash)
    acquire = only(first, name="store.acquire")
    complete = only(first, name="store.complete")
    upstream_span = only(first, kind=CLIENT)
    for child in (acquire, complete, upstream_span):
        assert child.parent_id == server.span_id, child.name
    assert acquire.kind == complete.kind == INTERNAL
    assert "idemproxy.store.found" not in acquire.attributes  # the lease was taken
    assert complete.attributes["idemproxy.store.lease_held"] is True
    assert upstream_span.attributes["http.response.status_code"] == 201
    assert upstream_span.attributes["url.full"] == f"{traced_upstream.url}/orders"
    assert upstream_span.attributes["server.port"] == int(traced_upstream.url.rsplit(":", 1)[1])

    # Across the upstream hop: the client's trace, the proxy's client span as the parent; the
    # client's own traceparent replaced (one header), its tracestate carried on.
    (call,) = traced_upstream.calls("/orders")
    trace_id, parent_id, flags = call.traceparent()
    assert (trace_id, parent_id, flags) == (first_trace, upstream_span.span_id, "01")
    assert call.all("tracestate") == ["vendor=opaque"]

    # The replay: its own server span, one store call, and no upstream span.
    replay_server = only(replay, kind=SERVER)
    assert replay_server.parent_id == replay_parent
    assert replay_server.attributes["idemproxy.outcome"] == "replayed"
    assert replay_server.attributes["idemproxy.replayed"] is True
    assert replay_server.attributes["idemproxy.key_hash"] == key_hash
    assert only(replay, name="store.acquire").attributes["idemproxy.store.found"] == "completed"
    assert [s for s in replay if s.kind == CLIENT] == []
    assert len(traced_upstream.calls("/orders")) == 1

    # The raw key is nowhere in what was exported.
    assert collector.bodies
    assert not any(RAW_KEY.encode() in body for body in collector.bodies)

    # The access lines lead to the traces.
    access = {line["trace_id"]: line for line in proxy.access_lines()}
    assert access[first_trace]["key_hash"] == key_hash
    assert access[first_trace]["outcome"] == "new"
    assert access[replay_trace]["outcome"] == "replayed"
    assert RAW_KEY not in proxy.stderr_path.read_text()


async def test_every_upstream_path_carries_the_proxys_span_and_a_trace_starts_without_one(
    tmp_path: Path,
    collector: Collector,
    traced_upstream: TracedUpstream,
    http: aiohttp.ClientSession,
) -> None:
    policy = KEYED_POLICY.format(endpoint=collector.endpoint)
    async with run_proxy(tmp_path, traced_upstream.url, policy) as proxy:
        # No valid traceparent from the client: the proxy starts the trace, and the upstream
        # gets the proxy's traceparent only.
        garbage = {"traceparent": "00-not-a-trace", "tracestate": "vendor=ignored"}
        async with http.get(f"{proxy.url}/catalog", headers=garbage) as r:  # the lean client
            assert r.status == 200

        # A body streamed through aiohttp's client (pass-through POST with a body).
        async def body() -> AsyncIterator[bytes]:
            yield b'{"streamed": '
            yield b"true}"

        async with http.post(f"{proxy.url}/feedback", data=body()) as r:
            assert r.status == 201
        # etag_from_get: the GET (aiohttp's client), then the PATCH (the lean client).
        patch_headers = {"If-Match": '"v1"'}
        async with http.patch(f"{proxy.url}/articles/1", data=b"{}", headers=patch_headers) as r:
            assert r.status == 201
        # A WebSocket upgrade (aiohttp's client).
        async with http.ws_connect(f"{proxy.url}/ws") as socket:
            await socket.send_str("ping")
            assert (await socket.receive(timeout=5)).data == "ping"

        calls = [
            *traced_upstream.calls("/catalog"),
            *traced_upstream.calls("/feedback"),
            *traced_upstream.calls("/articles/1"),
            *traced_upstream.calls("/ws"),
        ]
        assert [c.method for c in calls] == ["GET", "POST", "GET", "PATCH", "GET"]
        for call in calls:
            trace_id, parent_id, _ = call.traceparent()
            await collector.wait_for_trace(trace_id, {call.method})

            # The server span ends after the answer went out: it may come in a later batch.
            def server_span_arrived(t: str = trace_id) -> bool:
                return any(s.kind == SERVER for s in collector.trace(t))

            await collector.wait_for(server_span_arrived, f"the server span of {trace_id}")
            spans = collector.trace(trace_id)
            client = only(spans, span_id=parent_id)
            assert client.kind == CLIENT
            server = only(spans, kind=SERVER)
            assert server.parent_id == ""  # the proxy started this trace
            assert client.parent_id == server.span_id
        patch_trace = traced_upstream.calls("/articles/1")[0].traceparent()[0]
        assert traced_upstream.calls("/articles/1")[1].traceparent()[0] == patch_trace
        patch_server = only(collector.trace(patch_trace), kind=SERVER)
        assert patch_server.name == "PATCH /articles/{id}"
        assert patch_server.attributes["url.path"] == "/articles/1"
        assert traced_upstream.calls("/catalog")[0].all("tracestate") == []
        code, _ = await proxy.terminate()
        assert code == 0


async def test_waits_releases_and_upstream_failures_are_spans_and_event_lines_carry_the_trace(
    tmp_path: Path,
    collector: Collector,
    traced_upstream: TracedUpstream,
    http: aiohttp.ClientSession,
) -> None:
    policy = KEYED_POLICY.format(endpoint=collector.endpoint)
    waiter_trace, waiter_parent = ids(3)
    released_trace, released_parent = ids(4)
    broken_trace, broken_parent = ids(5)
    async with run_proxy(tmp_path, traced_upstream.url, policy) as proxy:
        slow = {"Idempotency-Key": "slow-1", "X-Test-Delay": "0.5"}

        async def post(path: str, headers: dict[str, str]) -> int:
            async with http.post(f"{proxy.url}{path}", data=b"{}", headers=headers) as r:
                await r.read()
                return r.status

        first = asyncio.create_task(post("/slow", slow))
        await _until(lambda: len(traced_upstream.calls("/slow")) == 1)
        waiter = {**slow, "traceparent": traceparent(waiter_trace, waiter_parent)}
        assert await post("/slow", waiter) == 201  # waited for the first one's answer
        assert await first == 201
        released = {
            "Idempotency-Key": "busy-1",
            "X-Test-Status": "503",
            "traceparent": traceparent(released_trace, released_parent),
        }
        assert await post("/orders", released) == 503
        broken = {
            "Idempotency-Key": "drop-1",
            "traceparent": traceparent(broken_trace, broken_parent),
        }
        assert await post("/drop", broken) == 502

        waited = await collector.wait_for_trace(waiter_trace, {"wait", "store.acquire"})
        released_spans = await collector.wait_for_trace(released_trace, {"store.release"})
        broken_spans = await collector.wait_for_trace(broken_trace, {"POST", "POST /drop"})
        code, _ = await proxy.terminate()
        assert code == 0

    server = only(waited, kind=SERVER)
    assert only(waited, name="wait").parent_id == server.span_id
    acquires = [s for s in waited if s.name == "store.acquire"]
    assert len(acquires) >= 2  # polled while the first one ran
    assert acquires[0].attributes["idemproxy.store.found"] == "in_flight"
    assert server.attributes["idemproxy.outcome"] == "replayed"
    assert [s for s in waited if s.kind == CLIENT] == []

    release = only(released_spans, name="store.release")
    assert release.attributes["idemproxy.store.lease_held"] is True
    assert only(released_spans, kind=SERVER).attributes["idemproxy.outcome"] == "released"
    assert only(released_spans, kind=CLIENT).attributes["error.type"] == "503"

    broken_client = only(broken_spans, kind=CLIENT)
    assert broken_client.attributes["error.type"] == "broken"
    assert broken_client.status_code == 2  # STATUS_CODE_ERROR
    broken_server = only(broken_spans, kind=SERVER)
    assert broken_server.attributes["http.response.status_code"] == 502
    assert broken_server.status_code == 2
    failures = [line for line in proxy.log_lines() if line["message"] == "upstream failure"]
    assert [line["trace_id"] for line in failures] == [broken_trace]


@pytest.mark.parametrize("how", ["policy", "environment"])
async def test_sampling_from_the_policy_or_the_environment(
    how: str,
    tmp_path: Path,
    collector: Collector,
    traced_upstream: TracedUpstream,
    http: aiohttp.ClientSession,
) -> None:
    """Ratio 0: new traces are not sampled (yet propagated), a client's sampled flag is
    followed. The environment variant also turns tracing on by OTEL_EXPORTER_OTLP_ENDPOINT; in
    the policy variant the policy wins over the environment."""
    if how == "policy":
        policy = f"""
            tracing:
              endpoint: {collector.endpoint}
              sample_ratio: 0
              service_name: from-the-policy
        """
        service = "from-the-policy"
        env = {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_SERVICE_NAME": "not-this-one"}
    else:
        policy, service = "", "from-the-environment"
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
            "OTEL_SERVICE_NAME": service,
        }
    sampled_trace, sampled_parent = ids(6)
    async with run_proxy(tmp_path, traced_upstream.url, policy, env) as proxy:
        async with http.post(f"{proxy.url}/a", data=b"{}") as r:
            assert r.status == 201
        headers = {"traceparent": traceparent(sampled_trace, sampled_parent)}
        async with http.post(f"{proxy.url}/b", data=b"{}", headers=headers) as r:
            assert r.status == 201
        spans = await collector.wait_for_trace(sampled_trace, {"POST /**", "POST"})
        code, _ = await proxy.terminate()
        assert code == 0
    unsampled_trace, _, flags = traced_upstream.calls("/a")[0].traceparent()
    assert int(flags, 16) & 1 == 0  # propagated, not sampled
    assert collector.trace(unsampled_trace) == []  # exported later than the sampled one: never
    assert only(spans, kind=SERVER).resource["service.name"] == service
    assert {line["trace_id"] for line in proxy.access_lines()} == {unsampled_trace, sampled_trace}


async def test_every_worker_exports_its_spans(
    tmp_path: Path,
    collector: Collector,
    traced_upstream: TracedUpstream,
    http: aiohttp.ClientSession,
    redis_server: RedisProcess,
) -> None:
    policy = f"tracing: {{endpoint: '{collector.endpoint}'}}\n"
    flags = ("--workers", "2", "--store", redis_server.url)
    async with run_proxy(tmp_path, traced_upstream.url, policy, None, *flags) as proxy:
        await _until(lambda: len(listening(proxy)) == 2)
        for n in range(20):  # spread over both workers by the kernel (SO_REUSEPORT)
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                headers = {"Idempotency-Key": f"workers-{uuid.uuid4().hex}"}
                async with fresh.post(f"{proxy.url}/orders", data=b"{}", headers=headers) as r:
                    assert r.status == 201, n
        calls = traced_upstream.calls("/orders")
        for call in calls:
            trace_id, parent_id, _ = call.traceparent()
            spans = await collector.wait_for_trace(trace_id, {"POST /**", "store.complete"})
            assert only(spans, kind=CLIENT).span_id == parent_id
        code, _ = await proxy.terminate()
        assert code == 0


def listening(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [line for line in proxy.log_lines() if line["message"] == "idemproxy worker started"]


# --- off unless configured -----------------------------------------------------------------


async def test_off_when_unconfigured_nothing_is_exported_and_traceparent_passes_untouched(
    tmp_path: Path,
    collector: Collector,
    traced_upstream: TracedUpstream,
    http: aiohttp.ClientSession,
) -> None:
    client_trace, client_parent = ids(7)
    # The collector runs, but nothing names it.
    async with run_proxy(tmp_path, traced_upstream.url) as proxy:
        headers = {
            "Idempotency-Key": "off-1",
            "traceparent": traceparent(client_trace, client_parent),
        }
        for _ in range(2):
            async with http.post(f"{proxy.url}/orders", data=b"{}", headers=headers) as r:
                assert r.status == 201
        async with http.post(f"{proxy.url}/orders", data=b"{}") as r:
            assert r.status == 201
        code, _ = await proxy.terminate()  # a tracer would have exported its spans by now
        assert code == 0
    assert collector.bodies == []
    first, second = traced_upstream.calls("/orders")
    assert first.all("traceparent") == [traceparent(client_trace, client_parent)]  # as sent
    assert second.all("traceparent") == []
    assert all("trace_id" not in line for line in proxy.log_lines())


NO_IMPORT = """
import asyncio, sys
import aiohttp
from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text
from idemproxy.tracing import NOOP

async def main():
    flags = Overrides(listen="127.0.0.1:0", admin="127.0.0.1:0", upstream=sys.argv[1])
    server = ProxyServer(load_text("", flags=flags))
    await server.start()
    url = "http://%s:%d/orders" % server.address
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # a new key and its replay
            async with http.post(url, data=b"{}", headers={"Idempotency-Key": "k"}) as r:
                assert r.status == 201, r.status
    await server.stop()
    assert server.tracer is NOOP
    print(sorted(m for m in sys.modules if m.partition(".")[0] == "opentelemetry"
                 or m == "idemproxy.otel"))

asyncio.run(main())
"""


async def test_off_the_proxy_never_imports_opentelemetry(traced_upstream: TracedUpstream) -> None:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", NO_IMPORT, traced_upstream.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_environment(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == "[]"
    assert len(traced_upstream.calls("/orders")) == 1


def test_start_tracing_is_the_no_op_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert start_tracing(TracingConfig(), {}) is NOOP
    assert start_tracing(TracingConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}) is NOOP
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    assert start_tracing(TracingConfig(endpoint="http://127.0.0.1:1"), disabled) is NOOP


def test_an_endpoint_in_the_environment_without_the_extra_warns_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(
        sys.modules, "idemproxy.otel", None
    )  # its import fails, as without the extra
    environ = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1/v1/traces"}
    assert start_tracing(TracingConfig(), environ) is NOOP
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set but the otel extra is not installed" in (
        caplog.text
    )
    with pytest.raises(SystemExit, match="pip install 'idemproxy\\[otel\\]'"):
        start_tracing(TracingConfig(endpoint="http://127.0.0.1:1"), {})


# --- the policy's tracing section ----------------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(textwrap.dedent(text), "policy.yaml", None, {})
    return [problem.render(caught.value.source) for problem in caught.value.problems]


def test_tracing_fields_are_read_and_checked_with_path_and_line() -> None:
    config = load_text(
        "tracing:\n  endpoint: http://collector:4318/\n  sample_ratio: 0.25\n  service_name: s\n"
    )
    assert config.tracing == TracingConfig("http://collector:4318", 0.25, "s")
    assert load_text("").tracing == TracingConfig()
    assert problems(
        """
        version: 1
        tracing:
          endpoint: grpc://collector:4317
          sample_ratio: 2
          service_name: ""
          exporter: zipkin
        """
    ) == [
        "policy.yaml:5: tracing.sample_ratio: expected a number from 0 to 1, got 2",
        "policy.yaml:7: tracing.exporter: unknown field (known fields: endpoint, sample_ratio, "
        "service_name)",
        "policy.yaml:4: tracing.endpoint: expected the collector's http:// or https:// OTLP/HTTP "
        "URL, got 'grpc://collector:4317'",
        "policy.yaml:6: tracing.service_name: must not be empty; leave it out for the default",
    ]


def test_an_endpoint_without_the_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = ("opentelemetry-api", "opentelemetry-sdk-not-installed-here")
    monkeypatch.setattr(config_module, "OTEL_DISTRIBUTIONS", missing)
    assert problems("tracing:\n  endpoint: http://127.0.0.1:4318\n") == [
        "policy.yaml:2: tracing.endpoint: tracing needs the otel extra "
        "(opentelemetry-sdk-not-installed-here is not installed): pip install 'idemproxy[otel]'"
    ]
    load_text("tracing: {sample_ratio: 0.5}")  # nothing asks for an exporter: no error


def test_run_refuses_an_endpoint_without_the_extra(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("tracing:\n  endpoint: http://127.0.0.1:4318\n")
    code = (
        "import sys; import idemproxy.config.resolve as c; "
        "c.OTEL_DISTRIBUTIONS = ('no-such-otel-distribution',); "
        "from idemproxy.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "run", "-c", str(policy), "--upstream", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_environment(),
        check=False,
    )
    assert result.returncode == 1
    assert "tracing.endpoint: tracing needs the otel extra" in result.stderr
    assert "Traceback" not in result.stderr


async def test_spans_still_queued_at_sigterm_are_exported(
    tmp_path: Path,
    collector: Collector,
    traced_upstream: TracedUpstream,
    http: aiohttp.ClientSession,
) -> None:
    env = {"OTEL_BSP_SCHEDULE_DELAY": "60000"}  # nothing leaves before the shutdown
    policy = f"tracing: {{endpoint: '{collector.endpoint}'}}\n"
    async with run_proxy(tmp_path, traced_upstream.url, policy, env) as proxy:
        async with http.post(f"{proxy.url}/orders", data=b"{}") as r:
            assert r.status == 201
        assert collector.spans == []
        code, _ = await proxy.terminate()
        assert code == 0
    (call,) = traced_upstream.calls("/orders")
    trace_id, _, _ = call.traceparent()
    assert {s.name for s in collector.trace(trace_id)} == {"POST /**", "POST"}


# --- the collector down --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def dead_collector(kind: str) -> AsyncIterator[str]:
    """An OTLP endpoint that refuses connections, or that accepts them and never answers."""
    if kind == "refusing":
        yield f"http://{HOST}:{free_port()}"
        return
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hang, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{HOST}:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("kind", ["refusing", "hanging"])
async def test_collector_down_requests_unaffected_and_sigterm_exits_in_time(
    kind: str, tmp_path: Path, traced_upstream: TracedUpstream, http: aiohttp.ClientSession
) -> None:
    """The exporter would retry for its 30 s timeout; the last export is bounded by what is
    left of shutdown_timeout (2 s here), so SIGTERM exits well within the bound below."""
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "30",  # seconds; unbounded, shutdown would wait
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # the spans are all still queued at SIGTERM
    }
    async with dead_collector(kind) as endpoint:
        policy = f"shutdown_timeout: 2s\ntracing: {{endpoint: '{endpoint}'}}\n"
        async with run_proxy(tmp_path, traced_upstream.url, policy, env) as proxy:
            for n in range(20):
                headers = {"Idempotency-Key": f"down-{n % 10}"}
                async with http.post(
                    f"{proxy.url}/orders",
                    data=b"{}",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as r:
                    assert r.status == 201
                    assert (r.headers.get("Idempotent-Replayed") == "true") == (n >= 10)
            code, took = await proxy.terminate(bound=20)
        assert code == 0
        assert took < 10, f"SIGTERM took {took:.1f}s"
    assert len(traced_upstream.calls("/orders")) == 10
    log = proxy.stderr_path.read_text()
    assert "Traceback" not in log
    assert "idemproxy stopped" in log


async def _until(done: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not done():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
