"""Hostile and broken input: arbitrary key values, JSON bodies on a pointer key route, odd
methods and paths (harness: hostile_harness)."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import HOST
from tests.hostile_harness import (
    BOUND,
    FORBIDDEN_IN_FIELDS,
    FUZZ,
    KEY_REQUIRED,
    NON_ASCII,
    VISIBLE,
    Harness,
    Proxy,
    assert_sane,
    build,
    exchange,
)

# --- 1. arbitrary Idempotency-Key values -------------------------------------------------------


def spec_key(raw: bytes) -> str | None:
    """The key SPEC section 4 says ``raw`` names, or None when it is ``idempotency_key_invalid``.

    HTTP drops optional whitespace (SP, HTAB) around a field value; then the RFC 8941 string form
    ``"abc"`` is unquoted (escapes: only backslash-quote and backslash-backslash); then the key
    must be 1-255 characters of 0x21-0x7E.
    """
    text = raw.strip(b" \t").decode("utf-8", "surrogateescape")
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            return None
        out: list[str] = []
        inner = iter(text[1:-1])
        for char in inner:
            if char == "\\":
                escaped = next(inner, None)
                if escaped not in ('"', "\\"):
                    return None
                out.append(escaped)
            elif char == '"':
                return None
            else:
                out.append(char)
        text = "".join(out)
    if not text or len(text) > 255 or not all("\x21" <= c <= "\x7e" for c in text):
        return None
    return text


def sf_quote(text: str) -> bytes:
    return ('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"').encode()


NO_LINE_BREAKS = st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b)
OWS = st.sampled_from([b"", b" ", b"\t", b"  "])

KEY_VALUES = st.one_of(
    st.text(VISIBLE, min_size=1, max_size=255).map(str.encode),
    st.text(VISIBLE, min_size=256, max_size=700).map(str.encode),
    st.text(VISIBLE, max_size=40).map(sf_quote),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(
        lambda s: b'"' + s.encode()
    ),
    st.text(VISIBLE, max_size=30).map(lambda s: s.encode() + b'"'),
    st.text(st.one_of(VISIBLE, NON_ASCII), min_size=1, max_size=40).map(str.encode),
    st.lists(st.sampled_from([b"a", b" ", b"\t", b'"', b"\\", b"\x00", b"\x1f", b"\x7f", b"\xff"]))
    .map(b"".join)
    .filter(lambda b: b.strip(b" \t") == b or b.strip(b" \t")),
    NO_LINE_BREAKS.filter(lambda b: not any(0x1C <= c <= 0x1F or c in (0x0B, 0x0C) for c in b)),
)


@settings(FUZZ, max_examples=120)
@given(value=KEY_VALUES, before=OWS, after=OWS)
@example(value=b"", before=b"", after=b"")
@example(value=b'""', before=b"", after=b"")
@example(value=b'"', before=b"", after=b"")
@example(value=b'"abc', before=b"", after=b"")
@example(value=b'abc"', before=b"", after=b"")
@example(value=b'"a"b"', before=b"", after=b"")
@example(value=b'"a\\"', before=b"", after=b"")
@example(value=b'"a\\b"', before=b"", after=b"")
@example(value=b'"a b"', before=b"", after=b"")
@example(value=b"x" * 255, before=b"", after=b"")
@example(value=b"x" * 256, before=b"", after=b"")
@example(value=b"x" * 4000, before=b"", after=b"")
@example(value="ключ".encode(), before=b"", after=b"")
@example(value=b"\xff\xfe", before=b"", after=b"")
@example(value=b"a\x00b", before=b"", after=b"")
@example(value=b"a\x7fb", before=b"", after=b"")
@example(value=b"a\tb", before=b"", after=b"")
def _key_property(
    harness: Harness, proxy: Proxy, value: bytes, before: bytes, after: bytes
) -> None:
    header = before + value + after
    request = build(b"POST", b"/orders", [(b"Idempotency-Key", header)], b'{"a": 1}')
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request), request)
    event(f"status {reply.status} {reply.code or ''}")
    key = spec_key(header)
    if key is None:
        assert reply.status == 400, (header, reply.status, reply.body)
        if not FORBIDDEN_IN_FIELDS.intersection(header):
            assert reply.code == "idempotency_key_invalid", (header, reply.body)
        assert len(harness.recorder.calls) == calls, "an invalid key reached the upstream"
    else:
        assert reply.status == 201, (header, reply.status, reply.body)
        assert reply.from_upstream
        fresh = reply.header("Idempotent-Replayed") is None
        assert len(harness.recorder.calls) == calls + fresh


def test_arbitrary_idempotency_key_values(harness: Harness) -> None:
    proxy = harness.proxy(KEY_REQUIRED)
    _key_property(harness, proxy)


@pytest.mark.parametrize(
    "value",
    ["abc\u00a0", "\u3000abc", "abc\u2028", "abc\u0085", '"abc"\u00a0'],
    ids=["nbsp", "ideographic-space", "line-separator", "nel", "quoted-nbsp"],
)
def test_unicode_whitespace_around_a_key_is_invalid(memory_harness: Harness, value: str) -> None:
    proxy = memory_harness.proxy(KEY_REQUIRED)
    request = build(b"POST", b"/orders", [(b"Idempotency-Key", value.encode())], b"{}")
    reply = assert_sane(exchange(proxy.port, request), request)
    assert (reply.status, reply.code) == (400, "idempotency_key_invalid"), reply.body
    assert not memory_harness.recorder.calls


# --- 2. arbitrary bodies on a JSON-pointer key route -------------------------------------------

BODY_KEY = """
routes:
  - match: {methods: [POST], path: /users}
    key: {from: body, pointer: /client_id}
"""
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
INVALID_CLIENT_IDS = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), JSON_SCALARS, max_size=3),
    st.just(""),
    st.text(VISIBLE, min_size=256, max_size=400),
    st.text(min_size=1, max_size=20).filter(lambda s: not all("\x21" <= c <= "\x7e" for c in s)),
    st.integers(min_value=10**256, max_value=10**400),  # more than 255 digits
)


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """A JSON object body and what it must get: ``new`` (keyed or not), or ``invalid``."""
    document = draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5))
    document.pop("client_id", None)
    kind = draw(st.sampled_from(["valid-str", "valid-int", "invalid", "absent"]))
    if kind == "valid-str":
        suffix = draw(st.text(VISIBLE, max_size=40))
        document["client_id"] = f"{uuid.uuid4().hex}{suffix}"[:255]
    elif kind == "valid-int":
        document["client_id"] = int(uuid.uuid4().int % 10**30)
    elif kind == "invalid":
        document["client_id"] = draw(INVALID_CLIENT_IDS)
    body = json.dumps(
        document,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 2])),
        sort_keys=draw(st.booleans()),
    ).encode()
    return body, "invalid" if kind == "invalid" else "new"


@FUZZ
@given(case=json_bodies())
def _json_body_property(harness: Harness, proxy: Proxy, case: tuple[bytes, str]) -> None:
    body, expected = case
    request = build(b"POST", b"/users", [(b"Content-Type", b"application/json")], body)
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request), request)
    if expected == "invalid":
        assert (reply.status, reply.code) == (400, "idempotency_key_invalid"), reply.body
        assert len(harness.recorder.calls) == calls
    else:
        assert reply.status == 201, (reply.status, reply.body)
        assert reply.header("Idempotent-Replayed") is None
        assert len(harness.recorder.calls) == calls + 1
        assert harness.recorder.calls[-1].body == body


def test_json_bodies_on_a_pointer_key_route(harness: Harness) -> None:
    proxy = harness.proxy(BODY_KEY)
    _json_body_property(harness, proxy)


JSON_TOKENS = st.sampled_from([
    b"{", b"}", b"[", b"]", b":", b",", b" ", b'"client_id"', b'"x"', b'"k-1"', b"1", b"-0",
    b"1e999999", b"1E-999999", b"9" * 60, b"null", b"true", b"NaN", b'"\\u0000"',
    b'"\\ud800"', b'"\\"', b'"', b"\\", b"\xef\xbb\xbf",
])  # fmt: skip
HUGE_INTEGER = b"9" * 5000
HOSTILE_BODIES = st.one_of(
    st.binary(max_size=300).filter(lambda b: _is_utf8(b)),
    st.text(max_size=200).map(str.encode),
    st.lists(JSON_TOKENS, max_size=40).map(b"".join),
)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(body=HOSTILE_BODIES)
@example(body=b"")
@example(body=b"[" * 100_000)
@example(body=b'{"client_id": "deep-1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
@example(body=b'{"client_id": "deep-2", "x": ' + b"[" * 900 + b"]" * 900 + b"}")
@example(body=b'{"client_id": "deep-3", "x": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}")
@example(body=b'{"client_id": 1e999999}')
@example(body=b'{"client_id": "huge-1", "n": 1e999999}')
@example(body=b'{"client_id": ' + HUGE_INTEGER + b"}")
@example(body=b'{"client_id": "huge-2", "n": ' + HUGE_INTEGER + b"}")
@example(body=b'{"client_id": "huge-3", "n": 0.' + HUGE_INTEGER + b"}")
@example(body=b'{"client_id": "dup-1", "client_id": "dup-2"}')
@example(body=b'{"client_id": "dup-3", "a": 1, "a": 2}')
@example(body=b'{"client_id": "nan-1", "n": NaN}')
@example(body=b'{"client_id": "\\u0000"}')
@example(body=b'{"client_id": "\\ud800"}')
@example(body=b'{"client_id": "lone-1", "x": "\\ud800"}')
@example(body=b'\xef\xbb\xbf{"client_id": "bom-1"}')
@example(body=b'{"client_id": "trailing-1"} garbage')
@example(body=b'{"client_id": "trailing-2"}{"client_id": "trailing-3"}')
@example(body=b'"client_id"')
@example(body=b'[{"client_id": "in-a-list"}]')
def _hostile_body_property(harness: Harness, proxy: Proxy, body: bytes) -> None:
    request = build(b"POST", b"/users", [], body)
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request), request)
    event(f"status {reply.status} {reply.code or ''}")
    if reply.status == 201:
        if reply.header("Idempotent-Replayed") is None:
            assert len(harness.recorder.calls) == calls + 1
            assert harness.recorder.calls[-1].body == body
        else:
            assert len(harness.recorder.calls) == calls
    else:
        assert (reply.status, reply.code) in {
            (400, "idempotency_key_invalid"),
            (422, "idempotency_key_reused"),
        }, (reply.status, reply.body)
        assert b"client_id" in body
        assert len(harness.recorder.calls) == calls


def test_hostile_bodies_on_a_pointer_key_route(harness: Harness) -> None:
    proxy = harness.proxy(BODY_KEY)
    _hostile_body_property(harness, proxy)


@pytest.mark.parametrize(
    "body",
    [
        b'{"client_id": "\xff"}',
        b'{"client_id": "ok-1", "note": "\xc3\x28"}',
        b'{"client_id": "ok-2", "note": "\xed\xa0\x80"}',
        b'"\x80"',
    ],
    ids=["in-the-key", "in-another-field", "encoded-surrogate", "bare-string"],
)
def test_invalid_utf8_in_a_json_body(harness: Harness, body: bytes) -> None:
    proxy = harness.proxy(BODY_KEY)
    request = build(b"POST", b"/users", [], body)
    reply = assert_sane(exchange(proxy.port, request), request)
    if reply.status == 201:
        assert harness.recorder.calls[-1].body == body
    else:
        assert reply.status == 400, reply.body


# --- 3. odd methods and paths ------------------------------------------------------------------

ROUTES = """
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
  - match: {methods: [PUT, DELETE], path: "/orders/{id}"}
"""
KNOWN_METHODS = st.sampled_from([
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    "PROPFIND", "MKCOL", "LOCK", "PURGE", "QUERY", "M-SEARCH", "SEARCH", "REPORT",
])  # fmt: skip
GARBAGE_METHODS = st.one_of(
    st.sampled_from(["post", "Post", "FOO", "GET\x00", "P OST", "", "POST\t"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
)
METHODS = st.one_of(KNOWN_METHODS, KNOWN_METHODS, KNOWN_METHODS, GARBAGE_METHODS)
SEGMENTS = st.one_of(
    st.sampled_from(["", ".", "..", "orders", "%2e", "%2E%2e", "%2F", "%2f..", "%00", "%zz"]),
    st.sampled_from(["%", "%%", "%u002e", ";x", "a;b=c", "\\..\\", "~", "!$&'()*+,=:@"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#")).map(
        lambda s: s.replace(" ", "")
    ),
    st.binary(min_size=1, max_size=6).map(lambda b: "".join(f"%{byte:02X}" for byte in b)),
    st.text(NON_ASCII, min_size=1, max_size=6),
    st.integers(min_value=500, max_value=3000).map(lambda n: "a" * n),
)
PATHS = st.tuples(
    st.lists(SEGMENTS, min_size=0, max_size=8),
    st.one_of(st.just(""), st.text(VISIBLE, max_size=40).map(lambda q: "?" + q)),
).map(lambda parts: "/" + "/".join(parts[0]) + parts[1])


@settings(FUZZ, max_examples=120)
@given(method=METHODS, path=PATHS, keyed=st.booleans())
@example(method="POST", path="/x/../orders", keyed=False)
@example(method="POST", path="//orders//", keyed=False)
@example(method="POST", path="/orders/%2e%2e", keyed=True)
@example(method="DELETE", path="/orders/" + "a" * 4000, keyed=True)
@example(method="GET", path="/" + "a" * 6000, keyed=False)
@example(method="POST", path="/" + "a" * 9000, keyed=False)
@example(method="CONNECT", path="/orders", keyed=True)
def _odd_request_property(
    harness: Harness, proxy: Proxy, method: str, path: str, keyed: bool
) -> None:
    target = path.encode("utf-8", "surrogateescape")
    headers = [(b"Idempotency-Key", uuid.uuid4().hex.encode())] if keyed else []
    request = build(method.encode(), target, headers, b"{}")
    calls = len(harness.recorder.calls)
    reply = assert_sane(exchange(proxy.port, request, head_request=method == "HEAD"), request)
    event(f"status {reply.status} {reply.code or ''}")
    if reply.from_upstream:
        assert reply.status == 201
        assert len(harness.recorder.calls) == calls + 1, "forwarded more than once"
        seen = harness.recorder.calls[-1]
        # The upstream sees the very request target and method the proxy was sent; a fragment
        # (not allowed in a request target) and an empty query's "?" may be dropped.
        base, _, query = path.partition("#")[0].partition("?")
        assert seen.method == method
        assert seen.raw_path in {path, path.partition("#")[0], f"{base}?{query}" if query else base}
    else:
        assert 400 <= reply.status < 500, (reply.status, reply.body)
        assert len(harness.recorder.calls) == calls
        if reply.code == "idempotency_key_missing":
            assert (method, keyed) == ("POST", False)


def test_odd_methods_and_paths(harness: Harness) -> None:
    proxy = harness.proxy(ROUTES)
    _odd_request_property(harness, proxy)


@pytest.mark.parametrize(
    ("method", "target", "keyed"),
    [
        (b"POST", b"http://127.0.0.1/orders?a=1", True),
        (b"GET", b"http://evil.example:1/x", False),
        (b"OPTIONS", b"*", False),
        (b"CONNECT", b"evil.example:443", False),
    ],
    ids=["absolute-form-keyed", "absolute-form-get", "asterisk-form", "authority-form"],
)
def test_non_origin_form_request_targets(
    memory_harness: Harness, method: bytes, target: bytes, keyed: bool
) -> None:
    proxy = memory_harness.proxy(ROUTES)
    headers = [(b"Idempotency-Key", b"target-form-1")] if keyed else []
    request = build(method, target, headers, b"{}")
    assert_sane(exchange(proxy.port, request), request)


@pytest.mark.parametrize("target", [b"/orders", b"/orders/1", b"evil.example:443"])
def test_connect_is_refused_whatever_its_target(memory_harness: Harness, target: bytes) -> None:
    """RFC 9110 9.3.6: CONNECT asks for a tunnel, and a reverse proxy opens none. One with a
    path was forwarded (aiohttp's client sent it on as ``CONNECT <upstream host:port>``) and
    the upstream's answer relayed (found by the hostile-input audit). The bytes after it may
    be the tunnel's: the connection closes rather than read them as the next request."""
    proxy = memory_harness.proxy(ROUTES)
    request = build(b"CONNECT", target, [(b"Idempotency-Key", b"connect-1")])
    reply = assert_sane(exchange(proxy.port, request), request)
    assert (reply.status, reply.code) == (400, "invalid_request_target"), reply.body
    tunnelled = b"GET /tunnelled HTTP/1.1\r\nHost: x\r\n\r\n"
    everything = b""
    with socket.create_connection((HOST, proxy.port), timeout=BOUND) as sock:
        sock.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n" + tunnelled)
        for _ in range(100):  # bounded: the proxy closes after one answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            everything += chunk
    assert everything.count(b"HTTP/1.1 ") == 1, everything
    assert not memory_harness.recorder.calls


@pytest.mark.parametrize("target", [b"/x/../orders", b"/./orders", b"/x/%2e%2e/orders"])
def test_dot_segments_do_not_slip_past_a_keyed_route(
    memory_harness: Harness, target: bytes
) -> None:
    proxy = memory_harness.proxy(KEY_REQUIRED)
    request = build(b"POST", target, [], b"{}")
    reply = assert_sane(exchange(proxy.port, request), request)
    assert not memory_harness.recorder.calls, "a key-required route was reached without a key"
    assert 400 <= reply.status < 500


ENCODED_SLASH_ROUTES = """
routes:
  - match: {methods: [POST], path: "/payments/{id}/capture"}
    key: {required: true}
  - match: {methods: [POST], path: /files/a/b}
    key: {required: true}
"""


@pytest.mark.parametrize("target", [b"/payments/a%2Fb/capture", b"/files/a%2fb"])
def test_an_encoded_slash_does_not_slip_past_a_keyed_route(
    memory_harness: Harness, target: bytes
) -> None:
    """SPEC 3: ``{name}`` is one segment, and ``a%2Fb`` is one (RFC 3986); an upstream that
    splits the path before decoding runs the capture. Before, matching on the decoded path saw
    four segments, so the key-required route was passed through without a key."""
    proxy = memory_harness.proxy(ENCODED_SLASH_ROUTES)
    request = build(b"POST", target, [], b"{}")
    reply = assert_sane(exchange(proxy.port, request), request)
    assert not memory_harness.recorder.calls, "a key-required route was reached without a key"
    assert (reply.status, reply.code) == (400, "idempotency_key_missing")
