"""The policy file as written: one dataclass per mapping, and the built-in defaults.

Every field is optional here (None means "not written"); ``resolve`` merges ``defaults`` and
``BUILTIN_DEFAULTS`` into each route. The JSON Schema (``idemproxy.schema``) is generated from
these same classes, so the file, its defaults and its schema cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from idemproxy.settings import (
    Ambiguous,
    Concurrency,
    FingerprintPart,
    KeySource,
    OnError,
    StoreMode,
)

# Markers for values that are strings in YAML and numbers in the config.
Duration = Annotated[float, "duration"]
Size = Annotated[int, "size"]
HostPort = Annotated[str, "host:port"]
# A release_statuses entry: a status code (503) or a status class (5xx), RFC 9110 section 15.
StatusOrClass = Annotated[int | str, "status"]
# An RFC 6901 JSON Pointer to a member of a JSON body, e.g. /meta/nonce.
JsonPointer = Annotated[str, "json-pointer"]
# A number from 0 to 1, e.g. the share of traces sampled.
Ratio = Annotated[float, "ratio"]

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


@dataclass(frozen=True)
class KeyFile:
    header: str | None = None
    from_: KeySource | None = field(default=None, metadata={"yaml": "from"})
    pointer: str | None = None
    name: str | None = None
    required: bool | None = None
    window: Duration | None = None


@dataclass(frozen=True)
class FingerprintFile:
    include: list[FingerprintPart] | None = None
    headers: list[str] | None = None
    json_canonical: bool | None = None
    ignore: list[JsonPointer] | None = None


@dataclass(frozen=True)
class ReplayFile:
    status: int | None = None


@dataclass(frozen=True)
class PolicyFile:
    """The fields a route inherits from ``defaults`` and may override."""

    key: KeyFile | None = None
    ttl: Duration | None = None
    lock_ttl: Duration | None = None
    concurrency: Concurrency | None = None
    wait_timeout: Duration | None = None
    fingerprint: FingerprintFile | None = None
    scope: list[str] | None = None
    release_statuses: list[StatusOrClass] | None = None
    ambiguous: Ambiguous | None = None
    max_request_body: Size | None = None
    max_stored_response: Size | None = None
    require_if_match: bool | None = None
    etag_from_get: bool | None = None
    replay: ReplayFile | None = None


@dataclass(frozen=True)
class MatchFile:
    path: str | None = None
    methods: list[str] | None = None


@dataclass(frozen=True)
class RouteFile(PolicyFile):
    name: str | None = None
    match: MatchFile | None = None
    idempotency: bool | None = None


@dataclass(frozen=True)
class AdminFile:
    listen: HostPort | None = None
    token: str | None = None


@dataclass(frozen=True)
class UpstreamFile:
    url: str | None = None
    timeout: Duration | None = None
    connect_timeout: Duration | None = None
    max_connections: int | None = None


@dataclass(frozen=True)
class StoreFile:
    url: str | None = None
    mode: StoreMode | None = None
    sentinels: list[HostPort] | None = None
    service_name: str | None = None
    key_prefix: str | None = None
    on_error: OnError | None = None
    wait_replicas: int | None = None
    wait_timeout: Duration | None = None


@dataclass(frozen=True)
class LimitsFile:
    max_request_line: Size | None = None
    max_header_size: Size | None = None
    max_headers: int | None = None
    idle_timeout: Duration | None = None
    header_timeout: Duration | None = None
    body_timeout: Duration | None = None
    max_in_flight: int | None = None
    memory_store_max_keys: int | None = None
    memory_store_max_bytes: Size | None = None


@dataclass(frozen=True)
class TracingFile:
    endpoint: str | None = None
    sample_ratio: Ratio | None = None
    service_name: str | None = None


@dataclass(frozen=True)
class PolicyDocument:
    version: int | None = None
    listen: HostPort | None = None
    shutdown_timeout: Duration | None = None
    admin: AdminFile | None = None
    upstream: UpstreamFile | None = None
    store: StoreFile | None = None
    defaults: PolicyFile | None = None
    routes: list[RouteFile] | None = None
    limits: LimitsFile | None = None
    tracing: TracingFile | None = None


# --- every default of the file, in one place (the limits' are settings.Limits' fields) --------

# A route's: merged under the file's own ``defaults`` and then under each route.
BUILTIN_DEFAULTS = PolicyFile(
    key=KeyFile(header="Idempotency-Key", from_="header", required=False),
    ttl=24 * 3600.0,
    lock_ttl=30.0,
    concurrency="reject",
    wait_timeout=10.0,
    fingerprint=FingerprintFile(
        include=["method", "path", "query", "body"], headers=[], json_canonical=True
    ),
    scope=["header:Authorization"],
    release_statuses=[408, 425, 429, 502, 503, 504],
    ambiguous="store",
    max_request_body=1024 * 1024,
    max_stored_response=1024 * 1024,
)
DEFAULT_WINDOW = 10.0  # key.window of a from: fingerprint route
DEFAULT_METHODS = ("POST", "PATCH")  # SPEC 2: what a route without match.methods keys
# The rest of the document's: merged under what the file writes.
BUILTIN_DOCUMENT = PolicyDocument(
    listen="127.0.0.1:8080",
    shutdown_timeout=30.0,
    admin=AdminFile(listen="127.0.0.1:9901", token=""),
    upstream=UpstreamFile(url="", timeout=60.0, connect_timeout=5.0, max_connections=256),
    store=StoreFile(
        url="memory://",
        mode="standalone",
        service_name="",
        key_prefix="idem:",
        on_error="fail_closed",
        wait_replicas=0,
        wait_timeout=0.1,
    ),
)


@dataclass(frozen=True)
class Overrides:
    """Command-line flags; each one, when given, wins over the file."""

    listen: str | None = None
    upstream: str | None = None
    store: str | None = None
    admin: str | None = None
