"""Policy file: YAML -> ${VAR} expansion -> validated, frozen config.

Loading happens in three steps, each collecting every problem instead of stopping at the first:

1. ``_read_yaml`` turns the YAML node tree into plain values and remembers the line of each field
   path (``routes[2].ttl`` -> 14), expanding ``${VAR}`` / ``${VAR:-default}`` in every string.
2. ``_build`` checks those values against the ``*File`` dataclasses below, which mirror the file
   one to one; unknown fields are errors, so a typo can never silently disable protection.
3. ``_resolve`` merges ``defaults`` into every route and produces the ``Config`` the proxy runs on.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from idemproxy.errors import ConfigError, ConfigProblem
from idemproxy.policy import check_pattern

__all__ = ["Config", "ConfigError", "Overrides", "RoutePolicy", "load", "load_text"]
from idemproxy.units import (
    is_loopback,
    is_token,
    parse_duration,
    parse_host_port,
    parse_size,
    redact,
)

Concurrency = Literal["reject", "wait"]
Ambiguous = Literal["store", "release"]
OnError = Literal["fail_closed", "fail_open"]
StoreMode = Literal["standalone", "sentinel", "cluster"]
KeySource = Literal["header", "body", "query", "fingerprint"]
FingerprintPart = Literal["method", "path", "query", "body"]

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


# --- the file, one dataclass per mapping; None means "not written" -------------------------


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


# --- the resolved config the proxy runs on --------------------------------------------------


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
DEFAULT_WINDOW = 10.0
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9901"


@dataclass(frozen=True)
class Overrides:
    """Command-line flags; each one, when given, wins over the file."""

    listen: str | None = None
    upstream: str | None = None
    store: str | None = None
    admin: str | None = None


# --- step 1: YAML with lines and ${VAR} expansion -------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class _Reader:
    def __init__(self, text: str, environ: typing.Mapping[str, str]) -> None:
        self.text = text
        self.environ = environ
        self.lines: dict[str, int] = {}
        self.problems: list[ConfigProblem] = []

    def read(self) -> object:
        try:
            self.loader = yaml.SafeLoader(self.text)
        except yaml.YAMLError as exc:  # e.g. a NUL or another character YAML does not allow
            self.problems.append(ConfigProblem("", f"not valid YAML: {exc}"))
            return None
        try:
            node = self.loader.get_single_node()
        except RecursionError:
            self.problems.append(ConfigProblem("", "not valid YAML: nested too deeply"))
            return None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            self.problems.append(ConfigProblem("", f"not valid YAML: {problem}", line))
            return None
        finally:
            self.loader.dispose()
        if node is None:
            return {}
        value = self._value(node, "")
        return {} if value is None else value  # a document of just "---" or "~" is empty

    def _value(self, node: yaml.Node, path: str) -> object:
        self.lines.setdefault(path, node.start_mark.line + 1)
        try:
            return self._construct(node, path)
        except RecursionError:
            message = "nested too deeply (or an alias refers to itself)"
            self.problems.append(ConfigProblem(path, message, node.start_mark.line + 1))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or node.start_mark
            problem = getattr(exc, "problem", None) or str(exc)
            self.problems.append(ConfigProblem(path, f"not valid here: {problem}", mark.line + 1))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            # PyYAML's constructors raise these for e.g. `!!int abc` or a 5000-digit number.
            message = f"cannot read this value ({type(exc).__name__})"
            self.problems.append(ConfigProblem(path, message, node.start_mark.line + 1))
        return None

    def _construct(self, node: yaml.Node, path: str) -> object:
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
            result: dict[str, object] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node)
                if not isinstance(key, str):
                    key = str(key)
                child = f"{path}.{key}" if path else key
                self.lines[child] = key_node.start_mark.line + 1
                if key in result:
                    self._problem(child, "duplicate field")
                    continue
                result[key] = self._value(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        value = self.loader.construct_object(node)
        if isinstance(value, str) and "${" in value:
            return self._expand(node, value, path)
        return value

    def _expand(self, node: yaml.Node, text: str, path: str) -> object:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.environ and (default is None or self.environ[name] != ""):
                return self.environ[name]
            if default is not None:
                return default
            self._problem(path, f"environment variable {name} is not set (write ${{{name}:-}})")
            return ""

        expanded = _ENV_REF.sub(substitute, text)
        if getattr(node, "style", None) is None:  # a plain scalar: let YAML type the result
            tag = self.loader.resolve(yaml.ScalarNode, expanded, (True, False))  # type: ignore[no-untyped-call]
            return self.loader.construct_object(yaml.ScalarNode(tag, expanded))
        return expanded

    def _problem(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message, self.lines.get(path)))


# --- step 2: values -> *File dataclasses ---------------------------------------------------


class _Invalid:
    """Marks a value that failed validation (its problem is already recorded)."""


INVALID = _Invalid()


_PARENT_STEP = re.compile(r"(\.?[^.\[\]]+|\[\d+\])$")


class _Builder:
    def __init__(self, lines: dict[str, int], problems: list[ConfigProblem]) -> None:
        self.lines = lines
        self.problems = problems

    def problem(self, path: str, message: str) -> _Invalid:
        """Record a problem at ``path``, with the line of the path or of its closest parent.

        A command-line flag (``--admin``) is not written in the file, so it gets no line.
        """
        line, parent = self.lines.get(path), path
        while line is None and parent and not path.startswith("--"):
            parent = _PARENT_STEP.sub("", parent)
            line = self.lines.get(parent)
        self.problems.append(ConfigProblem(path, message, line))
        return INVALID

    def build(self, hint: Any, value: object, path: str) -> Any:
        origin = get_origin(hint)
        if origin in (Union, types.UnionType):
            options = [arg for arg in get_args(hint) if arg is not type(None)]
            if value is None:
                return None
            return self.build(options[0], value, path)
        if origin is Annotated:
            base, marker = get_args(hint)
            return self._annotated(base, marker, value, path)
        if origin is Literal:
            choices = get_args(hint)
            if value not in choices:
                allowed = ", ".join(str(c) for c in choices)
                return self.problem(path, f"must be one of {allowed}, got {value!r}")
            return value
        if origin is list:
            (item_hint,) = get_args(hint)
            if not isinstance(value, list):
                return self.problem(path, f"expected a list, got {_kind(value)}")
            items = [self.build(item_hint, item, f"{path}[{i}]") for i, item in enumerate(value)]
            return [item for item in items if item is not INVALID]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return self._dataclass(hint, value, path)
        if hint is bool:
            if not isinstance(value, bool):
                return self.problem(path, f"expected true or false, got {value!r}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return self.problem(path, f"expected a whole number, got {value!r}")
            return value
        if hint is str:
            if not isinstance(value, str):
                return self.problem(path, f"expected a string, got {_kind(value)}")
            return value
        raise TypeError(f"unsupported config type {hint!r}")  # pragma: no cover - a coding error

    def _annotated(self, base: Any, marker: str, value: object, path: str) -> Any:
        parser = {
            "duration": parse_duration,
            "size": parse_size,
            "host:port": parse_host_port,
            "status": parse_status,
            "json-pointer": parse_json_pointer,
            "ratio": parse_ratio,
        }
        try:
            parsed = parser[marker](value)
        except ValueError as exc:
            return self.problem(path, str(exc))
        return value if base is str else parsed

    def _dataclass(self, cls: type[Any], value: object, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            return self.problem(path, f"expected a mapping, got {_kind(value)}")
        hints = get_type_hints(cls, include_extras=True)
        by_yaml_name = {f.metadata.get("yaml", f.name): f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, raw in value.items():
            shown = str(name) or "''"
            child = f"{path}.{shown}" if path else shown
            spec = by_yaml_name.get(name)
            if spec is None and not path and str(name).startswith("x-"):
                continue  # top-level x-* fields hold YAML anchors for reuse, as in Compose files
            if spec is None:
                known = ", ".join(sorted(by_yaml_name))
                self.problem(child, f"unknown field (known fields: {known})")
                continue
            built = self.build(hints[spec.name], raw, child)
            # An invalid field is left out (its problem is recorded) so that later checks
            # still run on the rest and every problem is reported in one go.
            if built is not INVALID:
                kwargs[spec.name] = built
        return cls(**kwargs)


_STATUS_CLASS = re.compile(r"[1-5]xx")


def parse_status(value: object) -> int | str:
    """A ``release_statuses`` entry: a status code (100 to 599) or a class, ``1xx`` to ``5xx``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 100 <= value <= 599:
            raise ValueError(f"{value} is not an HTTP status (100 to 599)")
        return value
    if isinstance(value, str) and _STATUS_CLASS.fullmatch(value):
        return value
    if isinstance(value, str) and _STATUS_CLASS.fullmatch(value.lower()):
        raise ValueError(f"write the status class {value!r} as {value.lower()}")
    if isinstance(value, str) and re.fullmatch(r"\dxx", value):
        raise ValueError(f"{value} is not an HTTP status class (1xx to 5xx)")
    raise ValueError(f"expected a status code like 503 or a class like 5xx, got {value!r}")


def parse_ratio(value: object) -> float:
    """A number from 0 to 1 (``tracing.sample_ratio``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number from 0 to 1, got {_kind(value)}")
    if not 0 <= value <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {value!r}")
    return float(value)


_MEMBER_POINTER = re.compile(r"(/([^~/]|~[01])*)+")


def parse_json_pointer(value: object) -> str:
    """An ``fingerprint.ignore`` entry: an RFC 6901 JSON Pointer to a member, not the root."""
    if not isinstance(value, str):
        raise ValueError(f"expected a JSON pointer like /sent_at, got {_kind(value)}")
    if value == "":
        raise ValueError(
            "the empty pointer is the whole body; to leave the body out of the fingerprint, "
            "remove body from fingerprint.include"
        )
    if not _MEMBER_POINTER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a JSON pointer (RFC 6901): it starts with / and writes ~ as ~0, "
            "/ inside a name as ~1"
        )
    return value


def pointer_tokens(pointer: str) -> tuple[str, ...]:
    """``/meta/a~1b`` -> ``("meta", "a/b")`` (RFC 6901 section 4: ~1 first, then ~0)."""
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:])


def status_codes(entries: list[int | str]) -> frozenset[int]:
    """The codes ``release_statuses`` names: a class ``4xx`` stands for 400 to 499."""
    codes: set[int] = set()
    for entry in entries:
        if isinstance(entry, int):
            codes.add(entry)
        else:
            first = int(entry[0]) * 100
            codes.update(range(first, first + 100))
    return frozenset(codes)


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


# --- step 3: merge defaults into routes, check the combinations -----------------------------


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

    def __init__(self, builder: _Builder) -> None:
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
            methods = ["POST", "PATCH"]
        elif not methods:
            self.problem(f"{path}.methods", "list at least one method, or leave methods out")
        for i, method in enumerate(methods):
            if method.upper() not in KNOWN_METHODS:
                self.problem(f"{path}.methods[{i}]", f"unknown HTTP method {method!r}")
        return pattern, frozenset(m.upper() for m in methods)


def _store_url(url: str) -> str | None:
    parts = urlsplit(url)
    if url == "memory://" or parts.scheme == "unix":
        return None
    if parts.scheme not in ("redis", "rediss"):
        got = f"{parts.scheme}://" if parts.scheme else repr(redact(url))
        return f"expected memory://, redis://, rediss:// or unix://, got {got}"
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"invalid port in {redact(url)!r}"
    if not parts.hostname:
        return f"no host in {redact(url)!r}"
    return None


def _upstream_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL with a host, got {redact(url)!r}"
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"invalid port in {redact(url)!r}"
    if parts.query or parts.fragment:
        return "the upstream URL must not have a query or fragment"
    if parts.username is not None or parts.password is not None:
        return "the upstream URL must not carry credentials; the client's own headers are forwarded"
    return None


def _resolve(doc: PolicyDocument, flags: Overrides, b: _Builder, source: str | None) -> Config:
    if doc.version not in (None, 1):
        b.problem("version", f"unsupported version {doc.version}; this idemproxy reads version 1")
    listen = _address(flags.listen, "--listen", doc.listen or DEFAULT_LISTEN, "listen", b)
    admin = doc.admin or AdminFile()
    admin_listen = _address(
        flags.admin, "--admin", admin.listen or DEFAULT_ADMIN_LISTEN, "admin.listen", b
    )
    if admin.token and admin.token != admin.token.strip():
        b.problem("admin.token", "the token must not start or end with spaces")
    if not admin.token and not is_loopback(admin_listen[0]):
        b.problem(
            "--admin" if flags.admin is not None else "admin.token",
            f"the admin listener would listen on {admin_listen[0]}, which other hosts may reach, "
            "without a token: set admin.token (e.g. token: ${IDEMPROXY_ADMIN_TOKEN}, from a "
            "secret), or bind the admin listener to loopback (127.0.0.1:9901)",
        )

    up = doc.upstream or UpstreamFile()
    written_url = flags.upstream or up.url or ""
    upstream_url = written_url.rstrip("/")
    if written_url:
        error = _upstream_url(written_url)
        if error:
            b.problem("--upstream" if flags.upstream else "upstream.url", error)
    if up.max_connections is not None and up.max_connections < 1:
        b.problem("upstream.max_connections", "must be at least 1")

    st = doc.store or StoreFile()
    store_url = flags.store or st.url or "memory://"
    error = _store_url(store_url)
    if error:
        b.problem("--store" if flags.store else "store.url", error)
    mode = st.mode or "standalone"
    sentinels = _sentinels(mode, st, store_url, b)

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
        admin_token=admin.token or "",
        shutdown_timeout=doc.shutdown_timeout or 30.0,
        upstream=UpstreamConfig(
            url=upstream_url,
            timeout=up.timeout or 60.0,
            connect_timeout=up.connect_timeout or 5.0,
            max_connections=up.max_connections or 256,
        ),
        store=StoreConfig(
            url=store_url,
            key_prefix=st.key_prefix if st.key_prefix is not None else "idem:",
            on_error=st.on_error or "fail_closed",
            mode=mode,
            sentinels=sentinels,
            service_name=st.service_name or "",
        ),
        routes=tuple(routes),
        source=source,
        tracing=_tracing(doc.tracing or TracingFile(), b),
    )


def _tracing(written: TracingFile, b: _Builder) -> TracingConfig:
    endpoint = written.endpoint or ""
    if endpoint:
        error = _collector_url(endpoint)
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


def _collector_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected the collector's http:// or https:// OTLP/HTTP URL, got {redact(url)!r}"
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"invalid port in {redact(url)!r}"
    if parts.query or parts.fragment:
        return "the collector URL must not have a query or fragment"
    return None


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


def _limits(written: LimitsFile, b: _Builder) -> Limits:
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
    return Limits(**values)


def _sentinels(
    mode: StoreMode, st: StoreFile, store_url: str, b: _Builder
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
    flag: str | None, flag_name: str, value: str, path: str, b: _Builder
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
    reader = _Reader(text, os.environ if environ is None else environ)
    raw = reader.read()
    builder = _Builder(reader.lines, reader.problems)
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
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem("", f"cannot read the file: {exc}")], path) from exc
    return load_text(text, path, flags, environ)
