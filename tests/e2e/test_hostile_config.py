"""Hostile and broken input: arbitrary YAML for `idemproxy check` (harness: hostile_harness)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from idemproxy.config import ConfigError, load_text
from tests.conftest import run_cli
from tests.hostile_harness import (
    FUZZ,
)

# --- 4. arbitrary YAML for `idemproxy check` -------------------------------------------------

FIELD_NAMES = [
    "version", "listen", "shutdown_timeout", "admin", "token", "upstream", "url", "timeout",
    "connect_timeout", "max_connections", "store", "mode", "sentinels", "service_name",
    "key_prefix", "on_error", "defaults", "key", "header", "from", "pointer", "name", "required",
    "window", "ttl", "lock_ttl", "concurrency", "wait_timeout", "fingerprint", "include",
    "headers", "json_canonical", "scope", "release_statuses", "ambiguous", "max_request_body",
    "max_stored_response", "routes", "match", "methods", "path", "idempotency",
    "require_if_match", "etag_from_get", "replay", "status", "x-anchor", "<<",
]  # fmt: skip
WORDS = [
    "30s", "250ms", "7d", "-1s", "0s", "1MiB", "512KiB", "-5", "POST", "PATCH", "GET", "BREW",
    "/orders", "/**", "/{id}", "/a/**/b", "orders", "{id}", "header", "body", "query",
    "fingerprint", "memory://", "redis://127.0.0.1:1/0", "ftp://x", "127.0.0.1:0", "[::1]:0",
    ":99999", "off", "on", "wait", "reject", "store", "release", "fail_open", "fail_closed",
    "standalone", "sentinel", "method", "path", "header:Authorization", "/client_id", "~1",
    "${NOPE}", "${NOPE:-x}", "${", "http://127.0.0.1:8000", "",
]  # fmt: skip
YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**60), max_value=10**60),  # 4300+ digits: a case below
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(WORDS),
)
YAML_KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=12), st.integers(-5, 5))
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(YAML_KEYS, inner, max_size=6),
    max_leaves=30,
)
YAML_DOCUMENTS = st.builds(
    lambda doc, flow, unicode: yaml.safe_dump(
        doc, default_flow_style=flow, allow_unicode=unicode, sort_keys=False
    ),
    st.one_of(st.dictionaries(YAML_KEYS, YAML_VALUES, max_size=8), YAML_VALUES),
    st.sampled_from([None, False, True]),
    st.booleans(),
)
# Characters a YAML stream may hold at all (YAML 1.1 "printable"); the others: a case below.
YAML_PRINTABLE = st.characters(
    codec="utf-8",
    exclude_categories=["Cs"],
    exclude_characters="".join(chr(c) for c in [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20)])
    + "\x7f"
    + "".join(chr(c) for c in range(0x80, 0xA0) if c != 0x85)
    + "\ufffe\uffff",
)
YAML_SNIPPETS = st.sampled_from([
    ":", "- ", "? ", "&a ", "*a", "!!str ", "!!binary ", "!!python/object:os.system ", "{", "}",
    "[", "]", "\n", "  ", "'", '"', "#", "|", ">", "---", "...", "%YAML 1.1", "<<: ", ",",
    "routes:", "match:", "path:", "key:", "ttl:", "30s", "\t", "!!set ", "!!null ",
])  # fmt: skip
YAML_TEXTS = st.one_of(
    YAML_DOCUMENTS,
    st.text(YAML_PRINTABLE, max_size=200),
    st.lists(st.one_of(YAML_SNIPPETS, st.text(YAML_PRINTABLE, max_size=5)), max_size=40).map(
        "".join
    ),
)


def assert_config_errors_are_located(exc: ConfigError) -> None:
    """Every problem names its field path, unless it is about the document itself."""
    assert exc.problems, "a ConfigError with no problem in it"
    document_level = ("not valid YAML", "not valid here", "expected a mapping", "nested too")
    for problem in exc.problems:
        located = problem.path or problem.message.startswith(document_level)
        assert located, problem
        assert "Traceback" not in problem.message


@settings(FUZZ, max_examples=400)
@given(text=YAML_TEXTS)
@example(text="")
@example(text="---\n...\n")
@example(text="~")
@example(text="[]")
@example(text="routes: [[[[]]]]")
@example(text="a: &a 1\nb: *a\n")
@example(text="x-anchor: &d {ttl: 1s}\ndefaults:\n  <<: *d\n")
@example(text="defaults: {<<: 5}")
@example(text="routes:\n  - <<: [1, 2]\n")
@example(text="? [1, 2]\n: 3\n")
@example(text="listen: !!binary aGVsbG8=")
@example(text="listen: !!set {a, b}")
@example(text="listen: 2001-12-14t21:59:43.10-05:00")
@example(text='listen: !!python/object/apply:os.system ["true"]')
@example(text="version: 1\nversion: 2\n")
@example(text="routes: {match: {path: /x}}")
@example(text="defaults: {ttl: .nan, lock_ttl: -.inf, max_request_body: 1e400}")
@example(text="\ufeffversion: 1\n")
def _yaml_property(text: str) -> None:
    try:
        load_text(text, environ={})
    except ConfigError as exc:
        assert_config_errors_are_located(exc)


def test_check_in_process_on_arbitrary_yaml() -> None:
    """The loader raises ConfigError, located, and nothing else (a traceback in ``check``)."""
    _yaml_property()


@settings(FUZZ, max_examples=4)
@given(text=YAML_TEXTS)
@example(text="routes: [{match: {path: /x}, ttl: forever}]\n")
def _cli_property(directory: Path, text: str) -> None:
    path = directory / f"policy-{uuid.uuid4().hex}.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode in (0, 1), result
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert result.stdout.startswith("ok: "), result.stdout
    else:
        lines = result.stderr.rstrip("\n").split("\n")  # not splitlines: field names may hold \x1e
        assert lines != [""], "exit 1 without saying why"
        for line in lines:
            assert line.startswith(f"{path}:"), line


def test_check_cli_on_arbitrary_yaml(tmp_path: Path) -> None:
    _cli_property(tmp_path)


LOADER_BREAKERS = [
    "nul", "escape-char", "deep-nesting", "self-alias-list", "self-alias-route", "huge-int",
    "int-tag", "float-tag", "bool-tag", "timestamp-tag", "alias-bomb",
    "python-tag-on-a-list", "python-tag-on-a-mapping", "set-tag-on-a-mapping",
]  # fmt: skip
# Nine anchors of nine aliases of the one before: a few lines that expand to 9**10 values.
# Before, the reader walked every one of them (hours, and memory without bound).
ALIAS_BOMB = "\n".join(
    ["version: 1", 'x-a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    + [f"x-a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["defaults: {scope: *a9}", ""]
)


@pytest.mark.parametrize(
    "text",
    [
        "version: \x00\n",
        "version: 1\x1b\n",
        "[" * 5000,
        "x-loop: &a [*a]\n",
        "routes: &r\n  - match: *r\n",
        "version: " + "9" * 5000 + "\n",
        "version: !!int abc\n",
        "shutdown_timeout: !!float abc\n",
        "x-flag: !!bool maybe\n",
        "listen: !!timestamp x\n",
        ALIAS_BOMB,
        # Tags on a list or a mapping were dropped: each read as a plain one, exit 0.
        'defaults:\n  scope: !!python/object/apply:os.system ["header:Authorization"]\n',
        "defaults: !!python/object:idemproxy.settings.Config\n  ttl: 5s\n",
        "defaults: !!set\n  ttl: 5s\n",
    ],
    ids=LOADER_BREAKERS,
)
def test_check_on_yaml_that_breaks_the_loader(tmp_path: Path, text: str) -> None:
    try:
        load_text(text, environ={})
    except ConfigError as exc:
        assert_config_errors_are_located(exc)
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr


def test_an_empty_field_name_at_the_root_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text("'': 1\nversion: 1\n", environ={})
    assert_config_errors_are_located(caught.value)


def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    """SPEC 2: each error names, where known, the file line. A Latin-1 byte in a comment was
    "cannot read the file: 'utf-8' codec can't decode byte 0xe9 in position 37" (found by the
    hostile-input audit)."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"version: 1\nlisten: 127.0.0.1:8080\n# caf\xe9\nroutes: []\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"{path}:3: "), result.stderr
    assert "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
