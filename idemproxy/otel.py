"""Tracing with OpenTelemetry (the ``otel`` extra); imported only by ``tracing.start_tracing``.

Spans follow OpenTelemetry's HTTP semantic conventions where they apply:

- the request: a ``SERVER`` span named ``{method} {route pattern}`` (``{method}`` when no route
  matched), child of the client's W3C ``traceparent`` when it sent a valid one;
  ``http.request.method``, ``url.path`` (never the query: it may hold a key), ``url.scheme``,
  ``http.route``, ``http.response.status_code``, ``client.address``,
  ``network.protocol.version``, and idemproxy's ``idemproxy.route`` (the label of the metrics),
  ``idemproxy.outcome``, ``idemproxy.replayed`` and ``idemproxy.key_hash`` (the hash the store
  and the logs use, never the raw key). A 5xx answer sets the span's status to error.
- each store call of a request: an ``INTERNAL`` span ``store.acquire``, ``store.renew``,
  ``store.complete``, ``store.release`` (``idemproxy.store.operation``; for acquire,
  ``idemproxy.store.found``: the state of the record found, absent when the lease was taken;
  ``error.type`` when the store failed); ``wait`` while a duplicate waits for its replay.
- the upstream exchange: a ``CLIENT`` span named ``{method}`` with ``server.address``,
  ``server.port``, ``url.full`` (the upstream URL without the query), ``http.response.status_code``
  or ``error.type`` (``connect``, ``timeout``, ``broken``: ``UpstreamFailure.kind``). The
  upstream gets a ``traceparent`` naming this span (the client's own is replaced, its
  ``tracestate`` carried on). A replay makes no upstream call, so it has no such span.

Spans are batched and exported over OTLP/HTTP by a thread of the SDK: a request only appends
its spans to a bounded queue, so a slow or absent collector slows no request (the queue drops
spans when full). ``shutdown`` bounds the last export, which otherwise retries for seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from contextvars import Token
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from idemproxy import __version__
from idemproxy.config.model import KNOWN_METHODS
from idemproxy.errors import StoreUnavailable, UpstreamFailure
from idemproxy.http1 import RawHeaders
from idemproxy.observability import Trace, event, set_trace_id_source
from idemproxy.problems import Outcome
from idemproxy.records import Record, StoredResponse
from idemproxy.redact import redact
from idemproxy.settings import TracingConfig, UpstreamConfig
from idemproxy.store import Store
from idemproxy.tracing import RequestSpan, Tracer
from idemproxy.upstream import Exchange, Upstream, forwarded_headers

# The client's trace headers are not forwarded as they came: the proxy's span takes their place.
_TRACE_HEADERS = (b"expect", b"traceparent", b"tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()


def _trace_id(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def _current_trace_id() -> str | None:
    return _trace_id(trace.get_current_span())


def _method(method: str) -> tuple[str, dict[str, str]]:
    """The ``http.request.method`` of ``method`` (``_OTHER`` for a method HTTP does not define,
    as the conventions ask) and the attributes that say so."""
    if method in KNOWN_METHODS:
        return method, {"http.request.method": method}
    return "HTTP", {"http.request.method": "_OTHER", "http.request.method_original": method}


class OtelTracer(Tracer):
    enabled = True

    def __init__(self, config: TracingConfig, environ: Mapping[str, str]) -> None:
        service = config.service_name or environ.get("OTEL_SERVICE_NAME") or "idemproxy"
        resource = Resource.create({"service.name": service, "service.version": __version__})
        # None: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: every
        # new trace, and a client's sampled flag followed).
        sampler: Sampler | None = None
        if config.sample_ratio is not None:
            sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
        # shutdown_on_exit=False: no atexit hook that could hold the process up; ``shutdown``
        # exports the last spans within its bound.
        self._provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
        # None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces.
        endpoint = f"{config.endpoint}/v1/traces" if config.endpoint else None
        self._exporter = OTLPSpanExporter(endpoint=endpoint)
        if endpoint is None:
            endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
                environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").rstrip("/") + "/v1/traces"
            )
        self._provider.add_span_processor(BatchSpanProcessor(self._exporter))
        self.tracer = self._provider.get_tracer("idemproxy", __version__)
        set_trace_id_source(_current_trace_id)
        event(
            "tracing on",
            endpoint=redact(endpoint),
            sampler=self._provider.sampler.get_description(),
            service_name=service,
        )

    def request(self, request: web.BaseRequest, trace_: Trace) -> RequestSpan:
        parent = _PROPAGATOR.extract(request.headers)
        name, attributes = _method(request.method)
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                **attributes,
                "url.path": request.path,
                "url.scheme": request.scheme,
                "network.protocol.version": f"{request.version.major}.{request.version.minor}",
                "client.address": request.remote or "",
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        trace_.trace_id = _trace_id(span)
        return _ServerSpan(span, name, token)

    def start_span(self, name: str) -> trace.Span:
        return self.tracer.start_span(name)

    def store(self, store: Store) -> Store:
        return TracedStore(store, self.tracer)

    def upstream(self, config: UpstreamConfig) -> Upstream:
        return TracedUpstream(config, self.tracer)

    async def shutdown(self, within: float) -> None:
        """Export the queued spans in a thread of its own, waiting at most ``within`` seconds.

        The SDK's own shutdown waits for its exporter, which retries an unreachable collector
        for up to its timeout (10 s by default). Past ``within`` the exporter is shut down,
        which ends its retries, and the thread (a daemon) is left behind: the process exits.
        """
        set_trace_id_source(None)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def export_the_rest() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=export_the_rest, name="idemproxy-trace-export", daemon=True).start()
        try:
            async with asyncio.timeout(within):
                await done.wait()
        except TimeoutError:
            event(
                "tracing: the collector did not take the last spans in time; they are dropped",
                logging.WARNING,
                within_seconds=within,
            )
            with contextlib.suppress(Exception):
                self._exporter.shutdown()  # type: ignore[no-untyped-call]


class _ServerSpan:
    __slots__ = ("_name", "_span", "_token")

    def __init__(self, span: trace.Span, name: str, token: Token[otel_context.Context]) -> None:
        self._span = span
        self._name = name
        self._token = token

    def finish(self, trace_: Trace, status: int) -> None:
        span = self._span
        try:
            if span.is_recording():
                if trace_.route_path is not None:
                    span.update_name(f"{self._name} {trace_.route_path}")
                    span.set_attribute("http.route", trace_.route_path)
                span.set_attributes(
                    {
                        "http.response.status_code": status,
                        "idemproxy.route": trace_.route,
                        "idemproxy.outcome": trace_.outcome.value,
                        "idemproxy.replayed": trace_.outcome is Outcome.REPLAYED,
                    }
                )
                if trace_.key_hash is not None:
                    span.set_attribute("idemproxy.key_hash", trace_.key_hash)
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(Status(StatusCode.ERROR))
            span.end()
        finally:
            otel_context.detach(self._token)


def _failed(span: trace.Span, error_type: str) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR))


class TracedStore:
    """A store whose calls, made while a request is traced, each have a span."""

    def __init__(self, inner: Store, tracer: trace.Tracer) -> None:
        self.inner = inner
        self._tracer = tracer

    @contextlib.contextmanager
    def _span(self, operation: str) -> Iterator[trace.Span | None]:
        if not trace.get_current_span().is_recording():
            # No sampled request around it: an unsampled one (nothing would be exported), the
            # admin's calls, or a settlement at shutdown.
            yield None
            return
        with self._tracer.start_as_current_span(
            f"store.{operation}",
            attributes={"idemproxy.store.operation": operation},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except StoreUnavailable:
                _failed(span, "store_unavailable")
                raise
            except BaseException as exc:
                _failed(span, type(exc).__qualname__)
                raise

    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        with self._span("acquire") as span:
            record = await self.inner.acquire(key, fingerprint, token, lock_ttl)
            if span is not None and record is not None:
                span.set_attribute("idemproxy.store.found", record.state)
            return record

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        with self._span("renew") as span:
            return _held(span, await self.inner.renew(key, token, lock_ttl))

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        with self._span("complete") as span:
            return _held(span, await self.inner.complete(key, token, response, ttl))

    async def release(self, key: str, token: str) -> bool:
        with self._span("release") as span:
            return _held(span, await self.inner.release(key, token))

    async def get(self, key: str) -> Record | None:
        return await self.inner.get(key)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def ping(self) -> None:
        await self.inner.ping()

    async def ready(self) -> None:
        await self.inner.ready()

    async def close(self) -> None:
        await self.inner.close()


def _held(span: trace.Span | None, held: bool) -> bool:
    """Record whether the lease was still ours (False: lost, another holder has the key)."""
    if span is not None:
        span.set_attribute("idemproxy.store.lease_held", held)
    return held


class TracedUpstream(Upstream):
    """The upstream with a client span per exchange, named in the ``traceparent`` it sends."""

    def __init__(self, config: UpstreamConfig, tracer: trace.Tracer) -> None:
        super().__init__(config)
        self._tracer = tracer
        url = URL(config.url)
        self._server: dict[str, Any] = {
            "server.address": url.host or "",
            "server.port": url.port or 0,
        }

    def forwarded(self, request: web.BaseRequest, drop_length: bool) -> RawHeaders:
        headers = forwarded_headers(request, drop_length, _TRACE_HEADERS)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)  # the current span: this exchange's client span
        headers.extend((name.encode(), value.encode()) for name, value in carrier.items())
        return headers

    @contextlib.contextmanager
    def _client_span(self, request: web.BaseRequest, method: str) -> Iterator[trace.Span]:
        name, attributes = _method(method)
        with self._tracer.start_as_current_span(
            name,
            kind=SpanKind.CLIENT,
            attributes={
                **attributes,
                **self._server,
                "url.full": self.base + request.raw_path.partition("?")[0],
                "network.protocol.version": "1.1",
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except UpstreamFailure as failure:
                _failed(span, failure.kind)
                raise
            except BaseException as exc:
                _failed(span, type(exc).__qualname__)
                raise

    async def exchange(
        self, request: web.BaseRequest, body: bytes, max_body: int | None
    ) -> Exchange:
        with self._client_span(request, request.method) as span:
            answer = await super().exchange(request, body, max_body)
            _answered(span, answer.status)
            return answer

    async def _stream_body(self, request: web.BaseRequest) -> Exchange:
        with self._client_span(request, request.method) as span:
            answer = await super()._stream_body(request)
            _answered(span, answer.status)
            return answer

    async def current_etag(self, request: web.BaseRequest) -> tuple[int, str | None]:
        with self._client_span(request, "GET") as span:
            status, etag = await super().current_etag(request)
            _answered(span, status)
            return status, etag

    async def open_websocket(
        self, request: web.BaseRequest
    ) -> aiohttp.ClientWebSocketResponse | Exchange:
        with self._client_span(request, "GET") as span:
            upgraded = await super().open_websocket(request)
            _answered(span, upgraded.status if isinstance(upgraded, Exchange) else 101)
            return upgraded


def _answered(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 400:  # the conventions' client side: a 4xx is an error of this call too
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
