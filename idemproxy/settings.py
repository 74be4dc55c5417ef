"""The settings the running proxy reads: frozen, complete, every default filled in.

The request path (``engine``, ``keys``, ``proxy``, ``upstream``, ``store``) imports these and
nothing of the policy-file loader in ``idemproxy.config``, which builds them once at start and
on SIGHUP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Concurrency = Literal["reject", "wait"]
Ambiguous = Literal["store", "release"]
OnError = Literal["fail_closed", "fail_open"]
StoreMode = Literal["standalone", "sentinel", "cluster"]
KeySource = Literal["header", "body", "query", "fingerprint"]
FingerprintPart = Literal["method", "path", "query", "body"]


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    source: KeySource
    header: str  # with from: fingerprint, the header whose key wins over the derived one
    pointer: str
    query_name: str
    required: bool
    window: float  # from: fingerprint only: how long a derived key is remembered


@dataclass(frozen=True, slots=True)
class FingerprintPolicy:
    include: frozenset[str]
    headers: tuple[str, ...]
    json_canonical: bool
    # JSON body members left out, each pointer split into its unescaped reference tokens.
    ignore: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    label: str
    path: str
    methods: frozenset[str]
    keyed: bool
    key: KeyPolicy
    ttl: float
    lock_ttl: float
    concurrency: Concurrency
    wait_timeout: float
    fingerprint: FingerprintPolicy
    scope_headers: tuple[str, ...]
    release_statuses: frozenset[int]
    ambiguous: Ambiguous
    max_request_body: int
    max_stored_response: int
    # A duplicate of a derived (from: fingerprint) key waits unless concurrency was written.
    derived_concurrency: Concurrency = "wait"
    require_if_match: bool = False
    etag_from_get: bool = False
    replay_status: int | None = None  # replays of a 201 are answered with this status


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    timeout: float
    connect_timeout: float
    max_connections: int


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str
    key_prefix: str
    on_error: OnError
    mode: StoreMode = "standalone"
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    # N > 0: every lease and completion is acknowledged by N replicas (Redis WAIT) in time.
    wait_replicas: int = 0
    wait_timeout: float = 0.1


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client can make the proxy hold; README lists the defaults and why."""

    max_request_line: int = 8190
    max_header_size: int = 8190
    max_headers: int = 100
    idle_timeout: float = 75.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_in_flight: int = 1024
    memory_store_max_keys: int = 1_000_000
    memory_store_max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry tracing as the policy writes it (idemproxy.tracing decides, at startup, with
    the standard OTEL_* environment variables, whether it is on)."""

    endpoint: str = ""  # the collector's OTLP/HTTP base URL; "": from OTEL_EXPORTER_OTLP_*
    sample_ratio: float | None = None  # None: OTEL_TRACES_SAMPLER / _ARG, else every trace
    service_name: str = ""  # "": OTEL_SERVICE_NAME, else idemproxy


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    admin_token: str
    shutdown_timeout: float
    upstream: UpstreamConfig
    store: StoreConfig
    routes: tuple[RoutePolicy, ...]
    limits: Limits = Limits()
    source: str | None = None
    tracing: TracingConfig = TracingConfig()
