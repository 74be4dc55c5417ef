"""JSON Schema (draft 2020-12) for the policy file, generated from the ``*File`` dataclasses.

The schema is derived from the type hints of ``idemproxy.config.model.PolicyDocument`` and the
dataclasses it refers to, so it cannot drift from the model the loader uses. It checks the file
as written (before ``${VAR}`` expansion); the loader's own checks go further (a route needs
``match.path``, durations must be greater than zero, ...).

It accepts every value the loader may accept, read by a YAML 1.1 or a YAML 1.2 tool:

- any value that is not a plain string may be a string with a ``${VAR}`` reference in it
  (expanded, then typed, by the loader);
- a boolean may be written ``off``, ``yes``, ... and an integer ``1_000``: the loader reads YAML
  1.1 (PyYAML), which types them; YAML 1.2 tools (editors, ``check-jsonschema``) see strings.

The generated copy shipped in the package, ``policy.schema.json``, is refreshed with::

    python -c "from idemproxy.schema import write_schema; write_schema()"
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from idemproxy.config.model import PolicyDocument

SCHEMA_FILE = Path(__file__).with_name("policy.schema.json")
SCHEMA_ID = "https://idemproxy.dev/schema/policy.json"

# One pattern per Annotated marker of idemproxy.config (syntax: idemproxy.policy_values).
PATTERNS = {
    "duration": r"^\d+(\.\d+)?(ms|s|m|h|d)$",
    "size": r"^\d+\s*(B|KiB|MiB|GiB)?$",
    "host:port": r"^.*:\d+$",
    "status": r"^[1-5]xx$",  # a status class; a status code is an integer
    "json-pointer": r"^(/([^~/]|~[01])*)+$",  # RFC 6901, any pointer but the whole document
}

# Strings that YAML 1.1 (the loader) reads as booleans and integers (PyYAML's resolver); YAML
# 1.2 reads most of them as strings.
YAML11_BOOLEANS = [
    *("yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"),
    *("true", "True", "TRUE", "false", "False", "FALSE"),
]
YAML11_INTEGER = (
    r"^[-+]?(0b[0-1_]+|0[0-7_]+|(0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|[1-9][0-9_]*(:[0-5]?[0-9])+)$"
)
# A ${VAR} or ${VAR:-default} reference somewhere in the string (as idemproxy.config expands).
ENV_REFERENCE = r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}"
SPELLINGS = {
    "env-reference": {
        "type": "string",
        "pattern": ENV_REFERENCE,
        "description": "Filled in from the environment: ${VAR} or ${VAR:-default}.",
    },
    "yaml-1.1-boolean": {
        "enum": YAML11_BOOLEANS,
        "description": "A boolean as YAML 1.1 (the loader) spells it, e.g. off.",
    },
    "yaml-1.1-integer": {
        "type": "string",
        "pattern": YAML11_INTEGER,
        "description": "An integer as YAML 1.1 (the loader) spells it, e.g. 1_000.",
    },
}

# Field descriptions, keyed by "<dataclass>.<yaml name>"; inherited fields use the base class.
DESCRIPTIONS = {
    "PolicyDocument.version": "Policy file format version; this idemproxy reads version 1.",
    "PolicyDocument.listen": "HOST:PORT the proxy listens on.",
    "PolicyDocument.shutdown_timeout": "On SIGTERM, how long in-flight requests may take.",
    "PolicyDocument.defaults": "Policy every route inherits.",
    "PolicyDocument.routes": "First match wins; unmatched requests pass through. "
    "With no routes, POST and PATCH on every path are keyed with the defaults.",
    "AdminFile.listen": "HOST:PORT of the admin (health and readiness) endpoint.",
    "AdminFile.token": "Bearer token of the keys API, e.g. ${IDEMPROXY_ADMIN_TOKEN:-}; "
    "required when admin.listen is not loopback.",
    "UpstreamFile.url": "http:// or https:// URL requests are forwarded to.",
    "UpstreamFile.timeout": "Bound on the whole upstream exchange.",
    "StoreFile.url": "memory://, redis://, rediss:// or unix://.",
    "StoreFile.sentinels": "HOST:PORT list, mode sentinel.",
    "StoreFile.service_name": "Sentinel service name, mode sentinel.",
    "StoreFile.on_error": "fail_closed: answer 503; fail_open: forward unprotected.",
    "StoreFile.wait_replicas": "N > 0: every lease and completion is acknowledged by N replicas "
    "(Redis WAIT) before the request is forwarded or the answer sent.",
    "StoreFile.wait_timeout": "How long a write may wait for the replicas (at most 1s).",
    "LimitsFile.memory_store_max_bytes": "memory:// store bound on stored responses and keys.",
    "KeyFile.header": "Header carrying the idempotency key.",
    "KeyFile.from": "Where the key comes from.",
    "KeyFile.pointer": "JSON pointer to the key in the body (from: body).",
    "KeyFile.name": "Query parameter holding the key (from: query).",
    "KeyFile.window": "How long a derived key is remembered (from: fingerprint).",
    "PolicyFile.key": "Where the idempotency key is read; a route's key merges into defaults.key.",
    "PolicyFile.ttl": "How long a completed response is kept and replayed.",
    "PolicyFile.lock_ttl": "Lease on an in-flight key; renewed while the upstream call runs.",
    "PolicyFile.concurrency": "reject: 409 at once; wait: block, then replay.",
    "PolicyFile.fingerprint": 'What makes two requests "the same request".',
    "PolicyFile.scope": "Keys live in a namespace per credential, e.g. header:Authorization.",
    "PolicyFile.release_statuses": "Statuses not stored: the client may retry and it runs again. "
    "Codes (503) or classes (4xx).",
    "PolicyFile.ambiguous": "Upstream timeout or lost connection: "
    "store (at most once) or release (at least once).",
    "PolicyFile.require_if_match": "Answer 428 to requests without If-Match.",
    "PolicyFile.etag_from_get": "GET the resource first; 412 when its ETag does not match.",
    "PolicyFile.replay": "How replays are answered, e.g. status: 200 replays a 201 as 200.",
    "FingerprintFile.json_canonical": "Compare JSON bodies by value, not key order or spacing.",
    "FingerprintFile.ignore": "JSON pointers (e.g. /sent_at) of body members left out of the "
    "fingerprint; needs json_canonical and a JSON body.",
    "RouteFile.name": "The route's label in metrics and logs (else its pattern).",
    "RouteFile.match": "Which requests the route applies to; methods default to [POST, PATCH].",
    "RouteFile.idempotency": "false (or a bare off): pass through.",
    "PolicyDocument.tracing": "OpenTelemetry tracing (the otel extra); on when an endpoint is "
    "set here or in OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.",
    "TracingFile.endpoint": "The collector's OTLP/HTTP base URL, e.g. http://127.0.0.1:4318; "
    "spans go to its /v1/traces. Needs the otel extra.",
    "TracingFile.sample_ratio": "Share of new traces sampled, 0 to 1; a client's sampled flag "
    "is followed. Else OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else every trace.",
    "TracingFile.service_name": "service.name of the spans; else OTEL_SERVICE_NAME, "
    "else idemproxy.",
}


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of the policy file."""
    defs: dict[str, Any] = {}
    root = _object(PolicyDocument, defs)
    root["patternProperties"] = {"^x-": {}}  # top-level x-* fields hold YAML anchors
    defs.update(SPELLINGS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "idemproxy policy file",
        **root,
        "$defs": defs,
    }


def schema_text() -> str:
    """The schema as shipped in ``policy.schema.json``."""
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_FILE) -> None:
    """Regenerate the shipped schema file after a change to the policy model."""
    path.write_text(schema_text(), encoding="utf-8")


def yaml_name(spec: dataclasses.Field[Any]) -> str:
    name: str = spec.metadata.get("yaml", spec.name)
    return name


def _object(cls: type[Any], defs: dict[str, Any]) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=True)
    properties: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        name = yaml_name(spec)
        prop = _type(hints[spec.name], defs)
        description = _description(cls, name)
        if description is not None:
            prop = {**prop, "description": description}
        properties[name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _description(cls: type[Any], name: str) -> str | None:
    for base in cls.__mro__:
        description = DESCRIPTIONS.get(f"{base.__name__}.{name}")
        if description is not None:
            return description
    return None


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


def _any_of(*options: dict[str, Any]) -> dict[str, Any]:
    """One of ``options``; nested anyOf lists are flattened."""
    flat: list[dict[str, Any]] = []
    for option in options:
        flat.extend(option["anyOf"] if set(option) == {"anyOf"} else [option])
    return flat[0] if len(flat) == 1 else {"anyOf": flat}


ENV = _ref("env-reference")
INTEGER = _ref("yaml-1.1-integer")


def _type(hint: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        # X | None: None means "not written", and YAML reads an empty value as null.
        options = [_type(arg, defs) for arg in get_args(hint) if arg is not type(None)]
        if type(None) in get_args(hint):
            options.append({"type": "null"})
        return _any_of(*options)
    if origin is Annotated:
        marker = get_args(hint)[1]
        if marker == "ratio":
            return _any_of({"type": "number", "minimum": 0, "maximum": 1}, ENV)
        string = {"type": "string", "pattern": PATTERNS[marker]}
        if marker == "size":
            return _any_of(string, {"type": "integer", "minimum": 0}, INTEGER, ENV)
        if marker == "status":
            return _any_of(
                {"type": "integer", "minimum": 100, "maximum": 599}, string, INTEGER, ENV
            )
        return _any_of(string, ENV)
    if origin is Literal:
        choices = list(get_args(hint))
        if all(isinstance(choice, str) for choice in choices):
            return _any_of({"type": "string", "enum": choices}, ENV)
        return _any_of({"enum": choices}, ENV)
    if origin is list:
        (item,) = get_args(hint)
        return {"type": "array", "items": _type(item, defs)}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if hint.__name__ not in defs:
            defs[hint.__name__] = {}  # reserve the name first: a dataclass may refer to itself
            defs[hint.__name__] = _object(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    if hint is bool:
        return _any_of({"type": "boolean"}, _ref("yaml-1.1-boolean"), ENV)
    if hint is int:
        return _any_of({"type": "integer"}, INTEGER, ENV)
    if hint is str:
        return {"type": "string"}
    raise TypeError(f"no JSON Schema for config type {hint!r}")
