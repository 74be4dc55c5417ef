"""Step 3 of loading: ``defaults`` merged into every route, combinations checked, and the
``settings.Config`` the proxy runs on produced; ``load`` and ``load_text`` run all three steps."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import os
import re
import typing
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from idemproxy.config.build import INVALID, Builder, status_codes
from idemproxy.config.model import (
    BUILTIN_DEFAULTS,
    BUILTIN_DOCUMENT,
    DEFAULT_METHODS,
    DEFAULT_WINDOW,
    KNOWN_METHODS,
    AdminFile,
    FingerprintFile,
    KeyFile,
    LimitsFile,
    MatchFile,
    Overrides,
    PolicyDocument,
    PolicyFile,
    RouteFile,
    StoreFile,
    TracingFile,
    UpstreamFile,
)
from idemproxy.config.reader import YamlReader
from idemproxy.errors import ConfigError, ConfigProblem
from idemproxy.policy import check_pattern
from idemproxy.policy_values import is_loopback, is_token, parse_host_port, pointer_tokens
from idemproxy.redact import redact
from idemproxy.settings import (
    Config,
    FingerprintPolicy,
    KeyPolicy,
    Limits,
    RoutePolicy,
    StoreConfig,
    StoreMode,
    TracingConfig,
    UpstreamConfig,
)


def _merge(base: Any, override: Any) -> Any:
    """Field-wise merge of two *File dataclasses: fields written in ``override`` win."""
    if override is None:
        return base
    if base is None:
        return override
    changes = {}
    for f in dataclasses.fields(base):
        mine, theirs = getattr(override, f.name), getattr(base, f.name)
        if dataclasses.is_dataclass(mine) and dataclasses.is_dataclass(theirs):
            changes[f.name] = _merge(theirs, mine)
        elif mine is not None:
            changes[f.name] = mine
    return dataclasses.replace(base, **changes)


_JSON_POINTER = re.compile(r"^(/([^~/]|~[01])*)*$")


class _Resolver:
    """Checks merged policies. A problem is reported where it was written: a field inherited
    from ``defaults`` is checked (and reported) once, at ``defaults``, not again per route."""

    def __init__(self, builder: Builder) -> None:
        self.b = builder
        self.reporting = True
        self.failed = False

    def problem(self, path: str, message: str) -> None:
        self.failed = True
        if self.reporting:
            self.b.problem(path, message)

    def check_defaults(self, defaults: PolicyFile, written: PolicyFile) -> None:
        self.failed = False
        self.policy_fields(defaults, written, "defaults")

    def route(
        self, defaults: PolicyFile, route: RouteFile, path: str, concurrency_written: bool
    ) -> RoutePolicy | None:
        merged: PolicyFile = _merge(defaults, route)
        if route.key is not None and route.key.from_ is not None:
            # A route that names its key source does not inherit another source's fields.
            own = route.key
            assert merged.key is not None
            merged = dataclasses.replace(
                merged,
                key=dataclasses.replace(
                    merged.key, pointer=own.pointer, name=own.name, window=own.window
                ),
            )
        self.failed = False
        key, scope, fingerprint, statuses, replay_status = self.policy_fields(merged, route, path)
        pattern, methods = self.match(route.match, f"{path}.match")
        if self.failed:
            return None
        # BUILTIN_DEFAULTS sets every field, so none of these can be None after the merge.
        assert merged.ttl is not None
        assert merged.lock_ttl is not None
        assert merged.wait_timeout is not None
        assert merged.concurrency is not None
        assert merged.ambiguous is not None
        assert merged.max_request_body is not None
        assert merged.max_stored_response is not None
        return RoutePolicy(
            label=route.name or f"{'|'.join(sorted(methods))} {pattern}",
            path=pattern,
            methods=methods,
            keyed=route.idempotency is not False,
            key=key,
            ttl=merged.ttl,
            lock_ttl=merged.lock_ttl,
            concurrency=merged.concurrency,
            wait_timeout=merged.wait_timeout,
            fingerprint=fingerprint,
            scope_headers=tuple(scope),
            release_statuses=statuses,
            ambiguous=merged.ambiguous,
            max_request_body=merged.max_request_body,
            max_stored_response=merged.max_stored_response,
            derived_concurrency=merged.concurrency if concurrency_written else "wait",
            require_if_match=bool(merged.require_if_match),
            etag_from_get=bool(merged.etag_from_get),
            replay_status=replay_status,
        )

    def policy_fields(
        self, merged: PolicyFile, written: PolicyFile, path: str
    ) -> tuple[KeyPolicy, list[str], FingerprintPolicy, frozenset[int], int | None]:
        """Check the fields shared by ``defaults`` and routes; report only those ``written``."""
        self.reporting = written.key is not None
        key = self.key(merged.key or KeyFile(), written.key, f"{path}.key")
        self.reporting = written.scope is not None
        scope = self.scope(merged.scope or [], f"{path}.scope")
        self.reporting = written.fingerprint is not None
        fingerprint = self.fingerprint(merged.fingerprint or FingerprintFile(), path)
        statuses = status_codes(merged.release_statuses or [])  # each entry checked when read
        self.reporting = written.replay is not None
        replay_status = merged.replay.status if merged.replay is not None else None
        if merged.replay is not None and (replay_status is None or not 200 <= replay_status <= 299):
            self.problem(f"{path}.replay.status", "replay.status must be a 2xx status")
        self.reporting = True
        return key, scope, fingerprint, statuses, replay_status

    def key(self, merged: KeyFile, written: KeyFile | None, path: str) -> KeyPolicy:
        source = merged.from_ or "header"
        mine = written or KeyFile()
        if source != "body" and merged.pointer is not None:
            self.problem(f"{path}.pointer", "pointer is only used with from: body")
        if source != "query" and merged.name is not None:
            self.problem(f"{path}.name", "name is only used with from: query")
        # The header name is inherited by every route, so only a written one can be misplaced.
        if source not in ("header", "fingerprint") and mine.header is not None:
            self.problem(f"{path}.header", f"header is not used with from: {source}")
        if source != "fingerprint" and merged.window is not None:
            self.problem(f"{path}.window", "window is only used with from: fingerprint")
        if source == "fingerprint" and merged.required:
            self.problem(
                f"{path}.required", "a from: fingerprint key is never missing; remove required"
            )
        header = merged.header or "Idempotency-Key"
        if not is_token(header):
            self.problem(f"{path}.header", f"{header!r} is not a valid header name")
        pointer = merged.pointer
        if source == "body":
            if pointer is None:
                self.problem(f"{path}.pointer", "from: body needs a JSON pointer, e.g. /id")
            elif not pointer or not _JSON_POINTER.match(pointer):
                self.problem(f"{path}.pointer", f"{pointer!r} is not a JSON pointer like /id")
        if source == "query" and not merged.name:
            self.problem(f"{path}.name", "from: query needs the parameter name")
        return KeyPolicy(
            source=source,
            header=header,
            pointer=pointer or "",
            query_name=merged.name or "",
            required=bool(merged.required),
            window=merged.window or DEFAULT_WINDOW,
        )

    def scope(self, entries: list[str], path: str) -> list[str]:
        headers = []
        for i, entry in enumerate(entries):
            kind, _, name = entry.partition(":")
            if kind != "header" or not is_token(name):
                self.problem(f"{path}[{i}]", f"expected header:NAME, got {entry!r}")
            else:
                headers.append(name)
        return headers

    def fingerprint(self, merged: FingerprintFile, path: str) -> FingerprintPolicy:
        headers = merged.headers or []
        for i, name in enumerate(headers):
            if not is_token(name):
                self.problem(f"{path}.fingerprint.headers[{i}]", f"{name!r} is not a header name")
        include = frozenset(merged.include or [])
        ignore = merged.ignore or []
        # ignore works on the canonical JSON of the body; anything else would silently do nothing.
        if ignore and "body" not in include:
            self.problem(f"{path}.fingerprint.ignore", "ignore needs body in fingerprint.include")
        if ignore and not merged.json_canonical:
            self.problem(
                f"{path}.fingerprint.ignore",
                "ignore needs json_canonical: true (members are left out of the JSON value)",
            )
        return FingerprintPolicy(
            include=include,
            headers=tuple(h.lower() for h in headers),
            json_canonical=bool(merged.json_canonical),
            ignore=tuple(pointer_tokens(pointer) for pointer in ignore),
        )

    def match(self, match: MatchFile | None, path: str) -> tuple[str, frozenset[str]]:
        pattern = match.path if match is not None else None
        if pattern is None:
            self.problem(f"{path}.path", "every route needs match.path")
            pattern = "/**"
        else:
            error = check_pattern(pattern)
            if error is not None:
                self.problem(f"{path}.path", error)
        methods = match.methods if match is not None else None
        if methods is None:
            methods = list(DEFAULT_METHODS)
        elif not methods:
            self.problem(f"{path}.methods", "list at least one method, or leave methods out")
        for i, method in enumerate(methods):
            if method.upper() not in KNOWN_METHODS:
                self.problem(f"{path}.methods[{i}]", f"unknown HTTP method {method!r}")
        return pattern, frozenset(m.upper() for m in methods)


def _store_url(url: str) -> str | None:
    """What the stores would fail on in ``url`` at run time, or None.

    ``check`` and ``run`` both load the policy through here, so a URL ``check`` passes never
    stops ``run`` with a traceback: the database number is read with ``int()`` by the lean
    client and the Sentinel path, and the query options by redis-py's own URL parser.
    """
    parts = urlsplit(url)
    shown = repr(redact(url.partition("?")[0]))  # a query may hold ?password=
    if url == "memory://":
        return None
    if parts.scheme not in ("redis", "rediss", "unix"):
        got = f"{parts.scheme}://" if parts.scheme else shown
        return f"expected memory://, redis://, rediss:// or unix://, got {got}"
    if parts.scheme == "unix":
        if not parts.path:
            return f"no socket path in {shown}: write unix:///path/to/redis.sock"
    else:
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            return f"invalid port in {shown}"
        if not parts.hostname:
            return f"no host in {shown}"
        database = parts.path.strip("/")
        if database and not database.isdigit():
            return f"the database in {shown} must be a number, as in redis://HOST:6379/0"
    # redis-py: store/ connects with it; here only its URL parser and its connection classes.
    from redis.asyncio.connection import Connection, ConnectionPool, parse_url

    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "db" and not value.isdigit():
            return f"?db= in {shown} must be a number, as in ?db=0"
    try:
        options = parse_url(url)
    except ValueError as exc:
        return f"{exc} ({shown})"
    # Every option becomes a keyword argument of the pool or its connection class; an unknown
    # one is a TypeError at the first connection.
    classes = (ConnectionPool, *options.get("connection_class", Connection).__mro__)
    accepted = {
        name
        for cls in classes
        if "__init__" in vars(cls)
        for name in inspect.signature(vars(cls)["__init__"]).parameters
    } - {"self", "kwargs", "connection_kwargs", "connection_class"}
    unknown = sorted({name for name, _ in parse_qsl(parts.query)} - accepted)
    if unknown:
        return f"unknown option {unknown[0]!r} in {shown}"
    return None


def _database(url: str) -> int:
    """The database a store URL that ``_store_url`` passed names (``?db=`` wins over the path)."""
    from redis.asyncio.connection import parse_url

    return int(parse_url(url).get("db") or 0)


def _http_url(url: str, expected: str, name: str) -> str | None:
    """What is wrong with an http:// or https:// URL the proxy connects to, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected {expected}, got {redact(url)!r}"
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"invalid port in {redact(url)!r}"
    if parts.query or parts.fragment:
        return f"the {name} URL must not have a query or fragment"
    return None


def _upstream_url(url: str) -> str | None:
    error = _http_url(url, "an http:// or https:// URL with a host", "upstream")
    parts = urlsplit(url)
    if error is None and (parts.username is not None or parts.password is not None):
        return "the upstream URL must not carry credentials; the client's own headers are forwarded"
    return error


def _resolve(doc: PolicyDocument, flags: Overrides, b: Builder, source: str | None) -> Config:
    if doc.version not in (None, 1):
        b.problem("version", f"unsupported version {doc.version}; this idemproxy reads version 1")
    # What the file wrote is checked as written; the values run are merged with the defaults.
    given: PolicyDocument = _merge(BUILTIN_DOCUMENT, doc)
    admin, up, st = (
        doc.admin or AdminFile(),
        doc.upstream or UpstreamFile(),
        doc.store or StoreFile(),
    )
    admin_run, up_run, st_run = _given(given.admin), _given(given.upstream), _given(given.store)
    listen = _address(flags.listen, "--listen", _given(given.listen), "listen", b)
    admin_listen = _address(flags.admin, "--admin", _given(admin_run.listen), "admin.listen", b)
    if admin.token and admin.token != admin.token.strip():
        b.problem("admin.token", "the token must not start or end with spaces")
    if not admin.token and not is_loopback(admin_listen[0]):
        b.problem(
            "--admin" if flags.admin is not None else "admin.token",
            f"the admin listener would listen on {admin_listen[0]}, which other hosts may reach, "
            "without a token: set admin.token (e.g. token: ${IDEMPROXY_ADMIN_TOKEN}, from a "
            "secret), or bind the admin listener to loopback (127.0.0.1:9901)",
        )

    written_url = flags.upstream or up.url or ""
    upstream_url = written_url.rstrip("/")
    if written_url:
        error = _upstream_url(written_url)
        if error:
            b.problem("--upstream" if flags.upstream else "upstream.url", error)
    if up.max_connections is not None and up.max_connections < 1:
        b.problem("upstream.max_connections", "must be at least 1")

    store_url = flags.store or _given(st_run.url)
    error = _store_url(store_url)
    if error:
        b.problem("--store" if flags.store else "store.url", error)
    mode: StoreMode = _given(st_run.mode)
    scheme = urlsplit(store_url).scheme
    if not error and mode == "cluster" and scheme in ("redis", "rediss") and _database(store_url):
        # redis-py refuses it when the client is made: run died with a traceback.
        b.problem(
            "--store" if flags.store else "store.url",
            "Redis Cluster has only database 0: leave the database out of the URL or write 0",
        )
    sentinels = _sentinels(mode, st, store_url, b)
    _wait_replicas(st, store_url, b)

    defaults = _merge(BUILTIN_DEFAULTS, doc.defaults)
    resolver = _Resolver(b)
    if doc.defaults is not None:
        resolver.check_defaults(defaults, doc.defaults)
    defaults_concurrency = doc.defaults is not None and doc.defaults.concurrency is not None
    routes_file = doc.routes
    if not routes_file:  # SPEC: with no routes (absent or []), POST and PATCH everywhere are keyed
        routes_file = [RouteFile(name="default", match=MatchFile(path="/**"))]
    routes = []
    for i, route in enumerate(routes_file):
        written = defaults_concurrency or route.concurrency is not None
        resolved = resolver.route(defaults, route, f"routes[{i}]", written)
        if resolved is not None:
            routes.append(resolved)
    return Config(
        limits=_limits(doc.limits or LimitsFile(), b),
        listen=listen,
        admin_listen=admin_listen,
        admin_token=_given(admin_run.token),
        shutdown_timeout=_given(given.shutdown_timeout),
        upstream=UpstreamConfig(
            url=upstream_url,
            timeout=_given(up_run.timeout),
            connect_timeout=_given(up_run.connect_timeout),
            max_connections=_given(up_run.max_connections),
        ),
        store=StoreConfig(
            url=store_url,
            key_prefix=_given(st_run.key_prefix),
            on_error=_given(st_run.on_error),
            mode=mode,
            sentinels=sentinels,
            service_name=_given(st_run.service_name),
            wait_replicas=_given(st_run.wait_replicas),
            wait_timeout=_given(st_run.wait_timeout),
        ),
        routes=tuple(routes),
        source=source,
        tracing=_tracing(doc.tracing or TracingFile(), b),
    )


def _tracing(written: TracingFile, b: Builder) -> TracingConfig:
    endpoint = written.endpoint or ""
    if endpoint:
        error = _http_url(
            endpoint, "the collector's http:// or https:// OTLP/HTTP URL", "collector"
        )
        if error:
            b.problem("tracing.endpoint", error)
        elif (missing := _missing_otel_distribution()) is not None:
            # Asked for in the file: refuse to run without it rather than silently not tracing.
            b.problem(
                "tracing.endpoint",
                f"tracing needs the otel extra ({missing} is not installed): "
                "pip install 'idemproxy[otel]'",
            )
    if written.service_name is not None and not written.service_name.strip():
        b.problem("tracing.service_name", "must not be empty; leave it out for the default")
    return TracingConfig(
        endpoint=endpoint.rstrip("/"),
        sample_ratio=written.sample_ratio,
        service_name=written.service_name or "",
    )


OTEL_DISTRIBUTIONS = (
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
)


def _missing_otel_distribution() -> str | None:
    """The first distribution of the otel extra that is not installed (read from the installed
    packages' metadata: nothing of OpenTelemetry is imported)."""
    for name in OTEL_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return name
    return None


T = typing.TypeVar("T")


def _given(value: T | None) -> T:
    """A value of the merged document: BUILTIN_DOCUMENT writes every field read this way."""
    assert value is not None
    return value


def _limits(written: LimitsFile, b: Builder) -> Limits:
    values = {
        f.name: getattr(written, f.name)
        for f in dataclasses.fields(written)
        if getattr(written, f.name) is not None
    }
    for name in ("max_headers", "max_in_flight", "memory_store_max_keys"):
        if values.get(name, 1) < 1:
            b.problem(f"limits.{name}", "must be at least 1")
    for name in ("max_request_line", "max_header_size"):
        if values.get(name, 1024) < 1024:
            b.problem(f"limits.{name}", "must be at least 1KiB")
    if values.get("memory_store_max_bytes", 1024 * 1024) < 1024 * 1024:
        b.problem("limits.memory_store_max_bytes", "must be at least 1MiB")
    return Limits(**values)


# WAIT and its script share one store call, bounded by the store timeout (2 s): leave room.
MAX_WAIT_TIMEOUT = 1.0


def _wait_replicas(st: StoreFile, store_url: str, b: Builder) -> None:
    """``wait_replicas`` needs replicated Redis; N is a whole number, not negative."""
    if st.wait_replicas is not None and st.wait_replicas < 0:
        b.problem("store.wait_replicas", f"must be 0 or more replicas, got {st.wait_replicas}")
    if st.wait_replicas and store_url == "memory://":
        b.problem(
            "store.wait_replicas",
            "the memory store has no replicas; wait_replicas needs a replicated Redis store",
        )
    if st.wait_timeout is not None:
        if st.wait_timeout < 0.001:
            b.problem("store.wait_timeout", "must be at least 1ms")
        elif st.wait_timeout > MAX_WAIT_TIMEOUT:
            b.problem(
                "store.wait_timeout",
                "must be at most 1s: the replicas' acknowledgement is part of a store call, "
                "which is bounded by 2s",
            )


def _sentinels(
    mode: StoreMode, st: StoreFile, store_url: str, b: Builder
) -> tuple[tuple[str, int], ...]:
    """Check the fields that only some store modes use; return the Sentinel addresses."""
    scheme = urlsplit(store_url).scheme
    if mode != "standalone" and scheme not in ("redis", "rediss"):
        b.problem("store.mode", f"mode {mode} needs a redis:// or rediss:// store URL")
    if mode != "sentinel":
        # An empty list is what the SPEC's own example writes; anything more would be ignored.
        if st.sentinels:
            b.problem("store.sentinels", "sentinels are only used with mode: sentinel")
        if st.service_name is not None and mode == "cluster":
            b.problem("store.service_name", "service_name is only used with mode: sentinel")
        return ()
    already_reported = any(p.path.startswith("store.sentinels[") for p in b.problems)
    if not st.sentinels and not already_reported:
        b.problem("store.sentinels", "mode sentinel needs at least one HOST:PORT")
    if not st.service_name:
        b.problem("store.service_name", "mode sentinel needs the master's service name")
    addresses = []
    for i, entry in enumerate(st.sentinels or []):
        try:
            addresses.append(parse_host_port(entry))
        except ValueError as exc:
            b.problem(f"store.sentinels[{i}]", str(exc))
    return tuple(addresses)


def _address(
    flag: str | None, flag_name: str, value: str, path: str, b: Builder
) -> tuple[str, int]:
    try:
        return parse_host_port(flag if flag is not None else value)
    except ValueError as exc:
        b.problem(flag_name if flag is not None else path, str(exc))
        return ("127.0.0.1", 0)


# --- entry points ---------------------------------------------------------------------------


def load_text(
    text: str,
    source: str | None = None,
    flags: Overrides | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """Parse and validate a policy document; raise ConfigError listing every problem."""
    reader = YamlReader(text, os.environ if environ is None else environ)
    raw = reader.read()
    builder = Builder(reader.lines, reader.problems, reader.expanded)
    doc = builder.build(PolicyDocument, raw, "") if raw is not None else INVALID
    config = (
        _resolve(doc, flags or Overrides(), builder, source)
        if isinstance(doc, PolicyDocument)
        else None
    )
    if builder.problems or config is None:
        raise ConfigError(builder.problems, source)
    return config


def load(
    path: str | None,
    flags: Overrides | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """Load the policy file at ``path`` (None: built-in defaults only), then apply ``flags``."""
    if path is None:
        return load_text("", None, flags, environ)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read the file: {exc}")], path) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"not valid YAML: not UTF-8 (byte 0x{data[exc.start]:02x})"
        raise ConfigError([ConfigProblem("", message, line)], path) from exc
    return load_text(text, path, flags, environ)
