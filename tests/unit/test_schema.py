"""The JSON Schema of the policy file (idemproxy/schema.py) and its shipped copy."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from idemproxy.config import ConfigError, load_text, model, parse_json_pointer, parse_status
from idemproxy.policy_values import parse_duration, parse_host_port, parse_size
from idemproxy.schema import (
    DESCRIPTIONS,
    PATTERNS,
    SCHEMA_FILE,
    SPELLINGS,
    YAML11_BOOLEANS,
    YAML11_INTEGER,
    policy_schema,
    schema_text,
    yaml_name,
)
from tests.conftest import run_cli

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "config").glob("*.yaml"))
SCHEMA = policy_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
# Every dataclass of the policy file model: the document and the *File mappings under it.
MODEL: list[type[Any]] = [
    cls
    for name, cls in vars(model).items()
    if isinstance(cls, type)
    and dataclasses.is_dataclass(cls)
    and (name.endswith("File") or name == "PolicyDocument")
]


def doc(text: str) -> Any:
    return yaml.safe_load(textwrap.dedent(text))


def error_path(document: Any) -> list[str | int] | None:
    """Where the most relevant schema error is (descending into anyOf/oneOf), None if valid."""
    error = jsonschema.exceptions.best_match(VALIDATOR.iter_errors(document))
    return None if error is None else list(error.absolute_path)


def test_shipped_schema_is_current() -> None:
    shipped = resources.files("idemproxy").joinpath("policy.schema.json").read_text("utf-8")
    assert shipped == schema_text(), (
        "idemproxy/policy.schema.json is out of date with the policy model; regenerate it with\n"
        '    python -c "from idemproxy.schema import write_schema; write_schema()"'
    )


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$id"] == "https://idemproxy.dev/schema/policy.json"
    assert SCHEMA["title"] == "idemproxy policy file"


def test_every_model_field_is_in_the_schema() -> None:
    assert len(MODEL) == 12, [cls.__name__ for cls in MODEL]
    for cls in MODEL:
        node = SCHEMA if cls is model.PolicyDocument else SCHEMA["$defs"][cls.__name__]
        expected = {yaml_name(spec) for spec in dataclasses.fields(cls)}
        assert set(node["properties"]) == expected, cls.__name__
        assert node["additionalProperties"] is False, cls.__name__
    models = {cls.__name__ for cls in MODEL} - {"PolicyDocument"}
    assert set(SCHEMA["$defs"]) == models | set(SPELLINGS)
    assert "from" in SCHEMA["$defs"]["KeyFile"]["properties"]  # the YAML name, not from_


def test_every_description_names_a_model_field() -> None:
    fields = {
        f"{cls.__name__}.{yaml_name(spec)}" for cls in MODEL for spec in dataclasses.fields(cls)
    }
    assert set(DESCRIPTIONS) <= fields, set(DESCRIPTIONS) - fields
    assert SCHEMA["$defs"]["RouteFile"]["properties"]["ttl"]["description"]  # inherited


def test_there_are_example_policies() -> None:
    assert len(EXAMPLES) >= 3, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policy_validates(path: Path) -> None:
    assert error_path(yaml.safe_load(path.read_text("utf-8"))) is None


ACCEPTED = {
    "x-anchors": """
        x-slow: &slow {ttl: 7d, wait_timeout: 30s}
        routes:
          - match: {path: /reports}
            <<: *slow
        """,
    "idempotency-off": """
        routes:
          - match: {path: "/internal/**"}
            idempotency: off
        """,
    "size-in-bytes": "defaults: {max_request_body: 2048, max_stored_response: 512 KiB}\n",
    "empty-values": "admin:\ndefaults:\n  key:\n  ttl:\n",
    # ${VAR} references in fields that are not plain strings: expanded, then typed.
    "env-host-port": "admin: {listen: '${ADMIN_LISTEN:-127.0.0.1:9901}'}\n",
    "env-typed": """
        upstream:
          timeout: ${TIMEOUT:-60s}
          max_connections: ${CONNS:-256}
        store:
          on_error: ${ON_ERROR:-fail_closed}
        defaults:
          key:
            required: ${KEY_REQUIRED:-true}
          max_request_body: ${MAX_BODY:-1MiB}
          release_statuses:
            - ${RELEASE:-503}
            - 4xx
        """,
    "yaml-1.1-spellings": "defaults: {key: {required: yes}}\nlimits: {max_in_flight: 1_000}\n",
    "status-classes": "defaults: {release_statuses: [4xx, 503]}\n",
    "fingerprint-ignore": "defaults: {fingerprint: {ignore: [/sent_at, /meta/nonce, /a~1b/0]}}\n",
    "tracing": "tracing: {endpoint: 'http://127.0.0.1:4318', sample_ratio: 0.25, service_name: a}",
    "tracing-ratio-integer": "tracing: {sample_ratio: 1}\n",
    "tracing-env": "tracing:\n  sample_ratio: ${RATIO:-0.5}\n",
}


@pytest.mark.parametrize("text", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_schema_and_loader_accept(text: str) -> None:
    assert error_path(doc(text)) is None
    load_text(textwrap.dedent(text), "policy.yaml", None, {})


REJECTED = {
    "unknown-field": ("lisen: 0.0.0.0:8080", []),
    "unknown-nested-field": (
        "routes: [{match: {path: /a}, key: {requried: true}}]",
        ["routes", 0, "key"],
    ),
    "x-field-below-top": ("defaults: {x-slow: 7d}", ["defaults"]),
    "bad-duration": ("defaults: {ttl: 30 sec}", ["defaults", "ttl"]),
    "duration-without-unit": ("upstream: {timeout: 30}", ["upstream", "timeout"]),
    "bad-size": ("defaults: {max_request_body: 1MB}", ["defaults", "max_request_body"]),
    "negative-size": ("defaults: {max_request_body: -1}", ["defaults", "max_request_body"]),
    "bad-enum": ("defaults: {concurrency: queue}", ["defaults", "concurrency"]),
    "bad-enum-in-list": (
        "defaults: {fingerprint: {include: [method, cookies]}}",
        ["defaults", "fingerprint", "include", 1],
    ),
    "string-for-integer": ("upstream: {max_connections: many}", ["upstream", "max_connections"]),
    "boolean-for-integer": ("version: true", ["version"]),
    "mapping-for-list": ("routes: {match: {path: /a}}", ["routes"]),
    "number-for-host-port": ("listen: 8080", ["listen"]),
    "status-class-6xx": (
        "defaults: {release_statuses: [6xx]}",
        ["defaults", "release_statuses", 0],
    ),
    "status-700": ("defaults: {release_statuses: [503, 700]}", ["defaults", "release_statuses", 1]),
    "status-class-upper-case": (
        "defaults: {release_statuses: [4XX]}",
        ["defaults", "release_statuses", 0],
    ),
    "ignore-not-a-pointer": (
        "defaults: {fingerprint: {ignore: [sent_at]}}",
        ["defaults", "fingerprint", "ignore", 0],
    ),
    "ignore-bad-escape": (
        "defaults: {fingerprint: {ignore: [/a~2]}}",
        ["defaults", "fingerprint", "ignore", 0],
    ),
    "ignore-whole-body": (
        "defaults: {fingerprint: {ignore: ['']}}",
        ["defaults", "fingerprint", "ignore", 0],
    ),
    "boolean-word": ("defaults: {key: {required: maybe}}", ["defaults", "key", "required"]),
    "ratio-above-1": ("tracing: {sample_ratio: 1.5}", ["tracing", "sample_ratio"]),
    "ratio-negative": ("tracing: {sample_ratio: -0.1}", ["tracing", "sample_ratio"]),
    "ratio-word": ("tracing: {sample_ratio: half}", ["tracing", "sample_ratio"]),
    "ratio-boolean": ("tracing: {sample_ratio: true}", ["tracing", "sample_ratio"]),
    "tracing-unknown-field": ("tracing: {endpoints: x}", ["tracing"]),
}


@pytest.mark.parametrize(("text", "path"), REJECTED.values(), ids=REJECTED.keys())
def test_schema_and_loader_reject(text: str, path: list[str | int]) -> None:
    assert error_path(doc(text)) == path
    with pytest.raises(ConfigError):
        load_text(text, "policy.yaml", None, {})


def accepts(parse: Callable[[object], object], value: str) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


SAMPLES = {
    "duration": (parse_duration, ["250ms", "30s", "1.5m", "24h", "7d", "30", "30 s", "1e3s", "5w"]),
    "size": (parse_size, ["512KiB", "1MiB", "2048", "10 B", "1MB", "-1", "1.5MiB", "KiB"]),
    "host:port": (parse_host_port, ["127.0.0.1:8080", ":8080", "[::1]:80", "8080", "h:", "h:x"]),
    "status": (parse_status, ["4xx", "1xx", "5xx", "6xx", "0xx", "4XX", "404", "4xx ", "xx"]),
    "json-pointer": (
        parse_json_pointer,
        ["/a", "/a/b", "/", "//", "/a~0b", "/a~1b", "/0", "", "a", "/a~", "/a~2", "~1"],
    ),
}


@pytest.mark.parametrize("marker", SAMPLES)
def test_patterns_agree_with_the_parsers(marker: str) -> None:
    parse, values = SAMPLES[marker]
    for value in values:
        assert bool(re.search(PATTERNS[marker], value)) == accepts(parse, value), value


def test_schema_command_prints_the_shipped_schema() -> None:
    result = run_cli("schema")
    assert result.returncode == 0
    assert result.stdout == SCHEMA_FILE.read_text(encoding="utf-8")


def test_yaml11_spellings_are_what_the_loader_reads_as_booleans_and_integers() -> None:
    for word in YAML11_BOOLEANS:
        assert isinstance(yaml.safe_load(f"v: {word}")["v"], bool), word
    for text in ["1_000", "0b101", "017", "0x1F", "1:30", "-5", "0", "+12", "1__"]:
        assert re.search(YAML11_INTEGER, text), text
        assert isinstance(yaml.safe_load(f"v: {text}")["v"], int), text
    for text in ["1.5", "1e3", "0o17", "ten", "_1", "1:60"]:
        assert not re.search(YAML11_INTEGER, text), text
        assert not isinstance(yaml.safe_load(f"v: {text}")["v"], int), text


def test_yaml12_readings_of_the_loaders_spellings_validate() -> None:
    """What a YAML 1.2 tool makes of YAML 1.1 booleans and integers: strings."""
    route = {"match": {"path": "/internal/**"}, "idempotency": "off"}
    document = {"routes": [route], "defaults": {"key": {"required": "yes"}, "ttl": None}}
    document["limits"] = {"max_in_flight": "1_000", "memory_store_max_keys": "0x10"}
    assert error_path(document) is None
    assert error_path({"routes": [{**route, "idempotency": "of"}]}) == ["routes", 0, "idempotency"]
