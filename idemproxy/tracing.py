"""Tracing: the interface the proxy calls, its no-op, and the choice between them at startup.

``start_tracing`` picks the tracer once, when a ``ProxyServer`` is made. With tracing off it is
``NOOP``: its calls do nothing and allocate nothing, the store and the upstream are the plain
ones, and ``opentelemetry`` is never imported. With tracing on it is ``idemproxy.otel``'s
``OtelTracer`` (the ``otel`` extra), imported here and only here.

Tracing is on when the policy's ``tracing.endpoint`` is set (the config refuses that without the
extra installed), or when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is (without the extra: a warning, and it stays off);
``OTEL_SDK_DISABLED=true`` keeps it off.

What a tracer does (README "Tracing"):

- ``request``: the server span of one request, the parent of everything below; it continues a
  client's W3C ``traceparent``. ``finish`` names it after the route and records the outcome.
- ``store``: the store the handler uses, with a span per call a request makes.
- ``upstream``: the upstream, with a client span per exchange; the ``traceparent`` the upstream
  receives names that span.
- ``start_span``: a span of the proxy's own (the wait of a duplicate for its replay).
- ``shutdown``: export what is left, within a bound.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Protocol

from aiohttp import web

from idemproxy.observability import Trace, event
from idemproxy.settings import TracingConfig, UpstreamConfig
from idemproxy.store import Store
from idemproxy.upstream import Upstream

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Span(Protocol):
    def end(self) -> None: ...


class RequestSpan(Protocol):
    def finish(self, trace: Trace, status: int) -> None:
        """Record what the request turned out to be (``trace``) and end the span."""


class _NoopSpan:
    __slots__ = ()

    def end(self) -> None:
        pass

    def finish(self, trace: Trace, status: int) -> None:
        pass


_NOOP_SPAN = _NoopSpan()


class Tracer:
    """The interface of a tracer, and the no-op one (tracing off)."""

    enabled = False

    def request(self, request: web.BaseRequest, trace: Trace) -> RequestSpan:
        return _NOOP_SPAN

    def start_span(self, name: str) -> Span:
        return _NOOP_SPAN

    def store(self, store: Store) -> Store:
        return store

    def upstream(self, config: UpstreamConfig) -> Upstream:
        return Upstream(config)

    async def shutdown(self, within: float) -> None:
        """Export the spans still queued, taking at most ``within`` seconds."""


NOOP = Tracer()


def tracing_wanted(config: TracingConfig, environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(config.endpoint) or any(environ.get(name) for name in ENDPOINT_VARIABLES)


def start_tracing(config: TracingConfig, environ: Mapping[str, str] | None = None) -> Tracer:
    """The tracer this process runs with: ``NOOP`` unless tracing is configured."""
    environ = os.environ if environ is None else environ
    if not tracing_wanted(config, environ):
        if config.endpoint:
            event("tracing is off: OTEL_SDK_DISABLED is true", logging.WARNING)
        return NOOP
    try:
        from idemproxy.otel import OtelTracer
    except ImportError as exc:
        if config.endpoint:  # the config found the extra installed, yet it does not import
            raise SystemExit(
                f"idemproxy: tracing.endpoint is set but OpenTelemetry does not import ({exc}); "
                "pip install 'idemproxy[otel]'"
            ) from exc
        variable = next(name for name in ENDPOINT_VARIABLES if environ.get(name))
        event(
            f"{variable} is set but the otel extra is not installed "
            "(pip install 'idemproxy[otel]'): tracing is off",
            logging.WARNING,
            error=str(exc),
        )
        return NOOP
    return OtelTracer(config, environ)
