"""idemproxy.keys: key extraction and validation, scoping, and request fingerprints."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from idemproxy.config import FingerprintPolicy, KeyPolicy, KeySource
from idemproxy.keys import (
    MAX_KEY_LENGTH,
    KeyProblem,
    derived_key,
    extract_key,
    fingerprint,
    if_match_allows,
    store_key,
)

# --- helpers ---------------------------------------------------------------------------------


def key_policy(
    source: KeySource = "header",
    *,
    header: str = "Idempotency-Key",
    pointer: str = "/client_id",
    query_name: str = "rid",
) -> KeyPolicy:
    return KeyPolicy(
        source=source,
        header=header,
        pointer=pointer,
        query_name=query_name,
        required=False,
        window=10.0,
    )


def lines(values: Mapping[str, str]) -> Callable[[str], list[str]]:
    """Header field lines (or query values) by name, one per name."""
    return lambda name: [values[name]] if name in values else []


NOTHING: Mapping[str, str] = {}


def from_header(value: str) -> str | KeyProblem:
    return extract_key(key_policy("header"), lines({"Idempotency-Key": value}), lines(NOTHING), b"")


def from_body(body: bytes, pointer: str = "/client_id") -> str | KeyProblem:
    return extract_key(key_policy("body", pointer=pointer), lines(NOTHING), lines(NOTHING), body)


def from_query(query: Mapping[str, str]) -> str | KeyProblem:
    return extract_key(key_policy("query"), lines(NOTHING), lines(query), b"")


def kind(result: str | KeyProblem) -> str:
    """``ok:<key>`` for a key, else the problem kind."""
    return f"ok:{result}" if isinstance(result, str) else result.kind


def fp_policy(
    include: tuple[str, ...] = ("method", "path", "query", "body"),
    headers: tuple[str, ...] = (),
    json_canonical: bool = True,
) -> FingerprintPolicy:
    return FingerprintPolicy(
        include=frozenset(include), headers=headers, json_canonical=json_canonical
    )


def fp(
    policy: FingerprintPolicy,
    body: bytes = b"",
    *,
    method: str = "POST",
    path: str = "/orders",
    query: str = "",
    headers: Mapping[str, list[str]] | None = None,
) -> str:
    found = dict(headers or {})

    def getall(name: str) -> list[str]:
        return found.get(name, [])

    return fingerprint(policy, method, path, query, getall, body)


# --- header keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("abc", "ok:abc"),
        ("  abc  ", "ok:abc"),  # surrounding optional whitespace is not part of the value
        ('"abc"', "ok:abc"),  # RFC 8941 sf-string names the same key as the bare form
        ('"a\\"b"', 'ok:a"b'),
        ('"a\\\\b"', "ok:a\\b"),
        ('"\\"\\\\"', 'ok:"\\'),
        ("8f14e45f-ceea-467f-a8f4-5b5d2f3c0e1d", "ok:8f14e45f-ceea-467f-a8f4-5b5d2f3c0e1d"),
        ("!~", "ok:!~"),  # both ends of 0x21-0x7E
        ("", "invalid"),
        ("   ", "invalid"),
        ('""', "invalid"),  # empty after unquoting
        ('"abc', "invalid"),  # unterminated
        ('"', "invalid"),
        ('"a"b"', "invalid"),  # unescaped quote inside
        ('"a\\x"', "invalid"),  # only \" and \\ are escapes
        ('"abc\\"', "invalid"),  # the closing quote is escaped: unterminated
        ('"a b"', "invalid"),  # validity is judged after unquoting
        ("a b", "invalid"),
        ("a\tb", "invalid"),
        ("a\x7fb", "invalid"),
        ("a\x00b", "invalid"),
        ("caf\u00e9", "invalid"),
        ("\u20ac", "invalid"),
    ],
)
def test_header_key(raw: str, expected: str) -> None:
    assert kind(from_header(raw)) == expected


def test_header_key_length_limit() -> None:
    assert MAX_KEY_LENGTH == 255
    assert kind(from_header("k" * 255)) == "ok:" + "k" * 255
    assert kind(from_header("k" * 256)) == "invalid"
    # the limit applies to the unquoted key, not the quoted header value
    assert kind(from_header('"' + "k" * 255 + '"')) == "ok:" + "k" * 255
    assert kind(from_header('"' + "k" * 256 + '"')) == "invalid"


def test_header_key_missing() -> None:
    result = extract_key(key_policy("header"), lines(NOTHING), lines(NOTHING), b"")
    assert isinstance(result, KeyProblem)
    assert result.kind == "missing"
    assert "Idempotency-Key" in result.detail


def test_header_key_uses_the_configured_header_name() -> None:
    policy = key_policy("header", header="X-Request-Id")
    found = extract_key(policy, lines({"X-Request-Id": "r1"}), lines(NOTHING), b"")
    assert found == "r1"
    other = extract_key(policy, lines({"Idempotency-Key": "r1"}), lines(NOTHING), b"")
    assert kind(other) == "missing"


def test_fingerprint_source_takes_a_client_key_from_the_header() -> None:
    policy = key_policy("fingerprint")
    assert extract_key(policy, lines({"Idempotency-Key": "c1"}), lines(NOTHING), b"") == "c1"
    assert kind(extract_key(policy, lines(NOTHING), lines(NOTHING), b"{}")) == "missing"
    assert kind(extract_key(policy, lines({"Idempotency-Key": ""}), lines(NOTHING), b"")) == (
        "invalid"
    )


def test_derived_key_can_never_equal_a_valid_client_key() -> None:
    derived = derived_key("0" * 64)
    assert derived != derived_key("1" * 64)
    assert kind(from_header(derived)) == "invalid"


# --- body keys (JSON pointer) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "pointer", "expected"),
    [
        (b'{"client_id": "abc"}', "/client_id", "ok:abc"),
        (b'{"order": {"meta": {"id": "n-1"}}}', "/order/meta/id", "ok:n-1"),
        (b'{"items": [{"id": "x"}, {"id": "y"}]}', "/items/1/id", "ok:y"),
        (b'[["a", "b"], ["c"]]', "/1/0", "ok:c"),
        (b'{"a/b": "slash"}', "/a~1b", "ok:slash"),
        (b'{"m~n": "tilde"}', "/m~0n", "ok:tilde"),
        (b'{"~1": "literal"}', "/~01", "ok:literal"),  # ~01 is "~1", not "/"
        (b'{"client_id": 42}', "/client_id", "ok:42"),
        (b'{"client_id": -7}', "/client_id", "ok:-7"),
        (b'{"client_id": "k"}', "/client_id", "ok:k"),
        # missing: the field cannot be found
        (b"client_id=abc", "/client_id", "missing"),  # not JSON
        (b"", "/client_id", "missing"),
        (b'{"client_id": "abc"', "/client_id", "missing"),  # truncated JSON
        (b'{"other": "abc"}', "/client_id", "missing"),
        (b'{"order": {}}', "/order/meta/id", "missing"),
        (b'{"items": [{"id": "x"}]}', "/items/1/id", "missing"),  # index out of range
        (b'{"items": [{"id": "x"}]}', "/items/-/id", "missing"),
        (b'{"a": "b"}', "/a/b", "missing"),  # descending into a string
        (b'"abc"', "/client_id", "missing"),
        # invalid: found, but not a usable key
        (b'{"client_id": true}', "/client_id", "invalid"),
        (b'{"client_id": false}', "/client_id", "invalid"),
        (b'{"client_id": {"id": "abc"}}', "/client_id", "invalid"),
        (b'{"client_id": ["abc"]}', "/client_id", "invalid"),
        (b'{"client_id": 1.5}', "/client_id", "invalid"),
        (b'{"client_id": null}', "/client_id", "invalid"),
        (b'{"client_id": ""}', "/client_id", "invalid"),
        (b'{"client_id": "a b"}', "/client_id", "invalid"),
        (b'{"client_id": "caf\\u00e9"}', "/client_id", "invalid"),
    ],
)
def test_body_key(body: bytes, pointer: str, expected: str) -> None:
    assert kind(from_body(body, pointer)) == expected


def test_body_key_length_limit() -> None:
    assert kind(from_body(b'{"client_id": "%s"}' % (b"k" * 255))) == "ok:" + "k" * 255
    assert kind(from_body(b'{"client_id": "%s"}' % (b"k" * 256))) == "invalid"


@pytest.mark.parametrize("coding", ["gzip", "br", "identity, gzip"])
def test_a_content_coded_body_key_is_invalid_not_absent(coding: str) -> None:
    body = b'{"client_id": "c-1"}'
    result = extract_key(
        key_policy("body"), lines({"Content-Encoding": coding}), lines(NOTHING), body
    )
    assert kind(result) == "invalid"
    plain = extract_key(
        key_policy("body"), lines({"Content-Encoding": "identity"}), lines(NOTHING), body
    )
    assert kind(plain) == "ok:c-1"


def test_body_key_ignores_headers() -> None:
    result = extract_key(
        key_policy("body"), lines({"Idempotency-Key": "from-header"}), lines(NOTHING), b"{}"
    )
    assert kind(result) == "missing"


# --- query keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"rid": "r-1"}, "ok:r-1"),
        ({"rid": "k" * 255}, "ok:" + "k" * 255),
        ({"rid": "k" * 256}, "invalid"),
        ({"rid": ""}, "invalid"),
        ({"rid": "a b"}, "invalid"),
        ({"rid": "caf\u00e9"}, "invalid"),
        ({}, "missing"),
        ({"other": "r-1"}, "missing"),
    ],
)
def test_query_key(query: Mapping[str, str], expected: str) -> None:
    assert kind(from_query(query)) == expected


def test_a_query_key_sent_twice_is_invalid_even_when_the_values_agree() -> None:
    """As with two Idempotency-Key lines (SPEC 4): frameworks differ on which of ?rid=a&rid=b
    they read, so the upstream may act on another value than the one the proxy keys on."""
    for values in (["a", "b"], ["a", "a"]):
        result = extract_key(key_policy("query"), lines(NOTHING), {"rid": values}.__getitem__, b"")
        assert kind(result) == "invalid"


def test_query_key_ignores_headers() -> None:
    result = extract_key(key_policy("query"), lines({"Idempotency-Key": "h"}), lines(NOTHING), b"")
    assert kind(result) == "missing"


# --- store_key -------------------------------------------------------------------------------


def test_store_key_is_deterministic_and_prefixed() -> None:
    first = store_key("idem:", ["Bearer a"], "k1")
    assert first == store_key("idem:", ["Bearer a"], "k1")
    assert first.startswith("idem:")
    assert store_key("other:", ["Bearer a"], "k1").removeprefix("other:") == first.removeprefix(
        "idem:"
    )


def test_store_key_does_not_contain_the_raw_key_or_credential() -> None:
    scoped = store_key("idem:", ["Bearer secret-token"], "my-key").removeprefix("idem:")
    assert "secret" not in scoped
    assert "my-key" not in scoped


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((["Bearer a"], "k1"), (["Bearer b"], "k1")),  # per credential
        ((["Bearer a"], "k1"), (["Bearer a"], "k2")),  # per key
        ((["Bearer a"], "k1"), ([""], "k1")),  # credential vs the empty namespace
        ((["ab"], "c"), (["a"], "bc")),  # no ambiguity where scope and key meet
        ((["a", "b"], "c"), (["ab"], "c")),
        ((["a", "b"], "c"), (["a"], "bc")),
        ((["", "a"], "k"), (["a", ""], "k")),  # order of scope values
        (([], "k"), ([""], "k")),
        (([], "k"), (["k"], "")),
    ],
)
def test_store_key_differs(a: tuple[list[str], str], b: tuple[list[str], str]) -> None:
    assert store_key("p:", *a) != store_key("p:", *b)


# --- fingerprint -----------------------------------------------------------------------------

JSON_A = b'{"amount": 100, "currency": "EUR", "items": [1, 2], "meta": {"x": 1, "y": null}}'
JSON_A_REORDERED = b'{ "meta" : {"y":null,"x":1},\n  "items":[1,2], "currency":"EUR","amount":100 }'


def test_json_bodies_are_equal_by_value_when_canonical() -> None:
    policy = fp_policy(json_canonical=True)
    assert fp(policy, JSON_A) == fp(policy, JSON_A_REORDERED)
    assert fp(policy, b' {"a": "\\u00e9"} ') == fp(policy, '{"a":"\u00e9"}'.encode())
    assert fp(policy, b"[1, 2]") == fp(policy, b"[1,2]")


@pytest.mark.parametrize(
    "other",
    [
        b'{"amount": 101, "currency": "EUR", "items": [1, 2], "meta": {"x": 1, "y": null}}',
        b'{"amount": 100, "currency": "EUR", "items": [2, 1], "meta": {"x": 1, "y": null}}',
        b'{"amount": 100, "currency": "EUR", "items": [1, 2], "meta": {"x": 1}}',
        b'{"amount": "100", "currency": "EUR", "items": [1, 2], "meta": {"x": 1, "y": null}}',
        b"",
    ],
    ids=["value", "array-order", "missing-field", "type", "empty"],
)
def test_json_bodies_that_differ_by_value_differ(other: bytes) -> None:
    policy = fp_policy(json_canonical=True)
    assert fp(policy, JSON_A) != fp(policy, other)


def test_json_bodies_compared_as_bytes_when_not_canonical() -> None:
    policy = fp_policy(json_canonical=False)
    assert fp(policy, JSON_A) != fp(policy, JSON_A_REORDERED)
    assert fp(policy, JSON_A) == fp(policy, JSON_A)
    assert fp(policy, b"[1, 2]") != fp(policy, b"[1,2]")


@pytest.mark.parametrize(
    "raw",
    [
        b'J{"a":1}',  # the canonical form of {"a": 1} behind the tag byte
        b'{"a":1}x',  # not JSON, starts like JSON
        b"R",
        b"",
    ],
)
def test_raw_body_never_collides_with_canonical_json(raw: bytes) -> None:
    policy = fp_policy(json_canonical=True)
    json_prints = {fp(policy, body) for body in (b'{"a":1}', b'{"a": 1}', b"[]", b"{}")}
    assert fp(policy, raw) not in json_prints


def test_raw_bodies_are_compared_byte_for_byte() -> None:
    policy = fp_policy(json_canonical=True)
    assert fp(policy, b"a=1&b=2") == fp(policy, b"a=1&b=2")
    assert fp(policy, b"a=1&b=2") != fp(policy, b"b=2&a=1")
    assert fp(policy, bytes(range(256))) != fp(policy, bytes(range(255)))


@pytest.mark.parametrize(
    ("part", "first", "second"),
    [
        ("method", {"method": "POST"}, {"method": "PUT"}),
        ("path", {"path": "/orders"}, {"path": "/orders/2"}),
        ("query", {"query": "a=1"}, {"query": "a=2"}),
        ("body", {"body": b'{"a": 1}'}, {"body": b'{"a": 2}'}),
    ],
)
def test_include_decides_which_parts_count(
    part: str, first: dict[str, object], second: dict[str, object]
) -> None:
    everything = ("method", "path", "query", "body")
    without = tuple(p for p in everything if p != part)

    def compute(policy: FingerprintPolicy, fields: dict[str, object]) -> str:
        body = fields.get("body", b"")
        assert isinstance(body, bytes)
        return fp(
            policy,
            body,
            method=str(fields.get("method", "POST")),
            path=str(fields.get("path", "/orders")),
            query=str(fields.get("query", "")),
        )

    assert compute(fp_policy(everything), first) != compute(fp_policy(everything), second)
    assert compute(fp_policy(without), first) == compute(fp_policy(without), second)


def test_empty_include_makes_every_request_the_same() -> None:
    policy = fp_policy(include=())
    assert fp(policy, b"a", method="POST", path="/x", query="q=1") == fp(
        policy, b"b", method="PATCH", path="/y", query="q=2"
    )


def test_parts_do_not_run_into_each_other() -> None:
    policy = fp_policy()
    assert fp(policy, path="/a", query="b=1") != fp(policy, path="/ab", query="=1")
    assert fp(policy, b"", method="POST", path="/x") != fp(policy, b"", method="POS", path="T/x")


def test_listed_headers_change_the_fingerprint() -> None:
    policy = fp_policy(headers=("Content-Type", "X-Tenant"))
    json_ct = {"Content-Type": ["application/json"], "X-Tenant": ["t1"]}
    assert fp(policy, b"{}", headers=json_ct) == fp(policy, b"{}", headers=dict(json_ct))
    assert fp(policy, b"{}", headers=json_ct) != fp(
        policy, b"{}", headers={**json_ct, "Content-Type": ["text/plain"]}
    )
    assert fp(policy, b"{}", headers=json_ct) != fp(
        policy, b"{}", headers={**json_ct, "X-Tenant": ["t2"]}
    )
    assert fp(policy, b"{}", headers=json_ct) != fp(
        policy, b"{}", headers={"Content-Type": ["application/json"]}
    )
    # repeated values count, in order
    assert fp(policy, b"{}", headers={"X-Tenant": ["a", "b"]}) != fp(
        policy, b"{}", headers={"X-Tenant": ["b", "a"]}
    )
    assert fp(policy, b"{}", headers={"X-Tenant": ["a", "b"]}) != fp(
        policy, b"{}", headers={"X-Tenant": ["a"]}
    )


def test_unlisted_headers_do_not_change_the_fingerprint() -> None:
    policy = fp_policy(headers=("X-Tenant",))
    base = {"X-Tenant": ["t1"]}
    assert fp(policy, b"{}", headers=base) == fp(
        policy, b"{}", headers={**base, "User-Agent": ["curl"], "Authorization": ["Bearer x"]}
    )
    assert fp(fp_policy(), b"{}", headers=base) == fp(fp_policy(), b"{}")


def test_headers_are_not_confused_with_each_other() -> None:
    policy = fp_policy(headers=("X-A", "X-B"))
    assert fp(policy, headers={"X-A": ["1"]}) != fp(policy, headers={"X-B": ["1"]})


def test_non_latin1_header_values_stay_distinct() -> None:
    policy = fp_policy(headers=("X-Currency",))
    euro = fp(policy, headers={"X-Currency": ["\u20ac"]})
    assert euro != fp(policy, headers={"X-Currency": ["\u20bd"]})
    assert euro != fp(policy, headers={"X-Currency": ["?"]})
    # aiohttp decodes header bytes as utf-8 with surrogateescape
    assert fp(policy, headers={"X-Currency": ["\udc80"]}) != fp(
        policy, headers={"X-Currency": ["\udc81"]}
    )


def test_json_numbers_beyond_double_precision_stay_distinct() -> None:
    policy = fp_policy(json_canonical=True)
    assert fp(policy, b'{"amount": 0.30000000000000001}') != fp(policy, b'{"amount": 0.3}')


def test_json_duplicate_names_are_not_collapsed() -> None:
    policy = fp_policy(json_canonical=True)
    assert fp(policy, b'{"amount": 1, "amount": 100}') != fp(policy, b'{"amount": 100}')


def test_json_numbers_compare_by_value() -> None:
    policy = fp_policy(json_canonical=True)
    assert fp(policy, b'{"amount": 1.0}') == fp(policy, b'{"amount": 1}')
    assert fp(policy, b'{"amount": 2.50}') == fp(policy, b'{"amount": 2.5}')
    assert fp(policy, b'{"amount": 2.5}') != fp(policy, b'{"amount": 2.05}')


def test_fingerprint_is_a_sha256_hex_digest() -> None:
    printed = fp(fp_policy(), JSON_A)
    assert len(printed) == 64
    int(printed, 16)


# --- If-Match --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("if_match", "exists", "current", "allowed"),
    [
        ('"v1"', True, '"v1"', True),
        ('"v0", "v1"', True, '"v1"', True),
        ('"v0"', True, '"v1"', False),
        ("*", True, '"v1"', True),
        ("*", True, None, True),  # a current resource without an ETag (RFC 9110 13.1.1)
        ("*", False, None, False),  # no current resource
        ('"v1"', True, None, False),
        ('"v1"', False, None, False),
        ('W/"v1"', True, 'W/"v1"', False),  # weak tags never match strongly
        ('"v1"', True, 'W/"v1"', False),
    ],
)
def test_if_match_allows(if_match: str, exists: bool, current: str | None, allowed: bool) -> None:
    assert if_match_allows(if_match, exists, current) is allowed


# --- one key, read one way (SPEC 4: repeated field lines, repeated body members) -------------


@pytest.mark.parametrize(
    "values",
    [["k1", "k2"], ["k1", "k1"], ['"k1"', "k1"]],
    ids=["different", "same", "quoted-and-bare"],
)
def test_two_key_field_lines_are_invalid_even_when_they_agree(values: list[str]) -> None:
    def header_lines(name: str) -> list[str]:
        return values if name == "Idempotency-Key" else []

    found = extract_key(key_policy("header"), header_lines, lines(NOTHING), b"")
    assert isinstance(found, KeyProblem)
    assert found.kind == "invalid"
    assert "once" in found.detail


@pytest.mark.parametrize(
    ("body", "pointer", "expected"),
    [
        (b'{"client_id": "a", "client_id": "b"}', "/client_id", "invalid"),
        # the same value twice is one key, read the same way by everyone
        (b'{"client_id": "a", "client_id": "a"}', "/client_id", "ok:a"),
        # an escaped spelling of the same name is the same member
        (b'{"client_id": "a", "client\\u005fid": "b"}', "/client_id", "invalid"),
        (b'{"order": {"id": "1", "id": "2"}}', "/order/id", "invalid"),
        (b'{"order": {"id": "1"}, "order": {"id": "2"}}', "/order/id", "invalid"),
        # a repeated member off the pointer's path does not matter
        (b'{"client_id": "a", "note": "x", "note": "y"}', "/client_id", "ok:a"),
        (b'{"client_id": "a", "x": {"client_id": "b"}}', "/client_id", "ok:a"),
        # equal to Python, not in JSON: the last one was read as the key (hostile-input audit)
        (b'{"client_id": true, "client_id": 1}', "/client_id", "invalid"),
        (b'{"client_id": false, "client_id": 0}', "/client_id", "invalid"),
        (b'{"client_id": 1.0, "client_id": 1}', "/client_id", "invalid"),
        (b'{"order": {"id": true}, "order": {"id": 1}}', "/order/id", "invalid"),
        (
            b'{"order": {"id": "1", "n": [0]}, "order": {"id": "1", "n": [false]}}',
            "/order/id",
            "invalid",
        ),
    ],
    ids=[
        "differs",
        "agrees",
        "escaped",
        "nested",
        "parent-repeated",
        "off-path",
        "elsewhere",
        "true-then-1",
        "false-then-0",
        "1.0-then-1",
        "parent-true-then-1",
        "parent-list-differs",
    ],
)
def test_a_body_key_repeated_with_different_values_is_invalid(
    body: bytes, pointer: str, expected: str
) -> None:
    assert kind(from_body(body, pointer)) == expected
