"""Idempotency keys and request fingerprints. Pure: no I/O, no aiohttp.

- ``extract_key`` finds the client's key (header, JSON pointer into the body, query parameter).
- ``store_key`` scopes it per credential: prefix + sha256(scope values, key).
- ``fingerprint`` says what makes two requests "the same request" (sha256, collision-resistant).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from idemproxy.policy_values import pointer_tokens
from idemproxy.settings import FingerprintPolicy, KeyPolicy

MAX_KEY_LENGTH = 255
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class KeyProblem:
    """Why a request has no usable key: ``missing`` or ``invalid``."""

    kind: str
    detail: str


def extract_key(
    policy: KeyPolicy,
    header_lines: Callable[[str], Sequence[str]],
    query_values: Callable[[str], Sequence[str]],
    body: bytes,
) -> str | KeyProblem:
    """The client's key, or why there is none. ``header_lines``: every field line of a name;
    ``query_values``: every value of a query parameter."""
    if policy.source in ("header", "fingerprint"):  # a client's key wins over a derived one
        lines = header_lines(policy.header)
        if not lines:
            return KeyProblem("missing", f"send the {policy.header} header")
        if len(lines) > 1:
            # RFC 9110 5.3 joins field lines into one list value, which is not one key: the
            # upstream may read the lines differently from the key the proxy would protect.
            return KeyProblem(
                "invalid", f"send the {policy.header} header once, not {len(lines)} times"
            )
        # Only the HTTP whitespace around a field value; any other character counts.
        where = f"the {policy.header} header"
        return _validate(unquote_sf_string(lines[0].strip(" \t")), where)
    if policy.source == "query":
        values = query_values(policy.query_name)
        if not values:
            return KeyProblem("missing", f"send the {policy.query_name} query parameter")
        if len(values) > 1:
            # As with two header lines: the upstream may read another one than the proxy keys.
            return KeyProblem(
                "invalid",
                f"send the {policy.query_name} query parameter once, not {len(values)} times",
            )
        return _validate(values[0], f"the {policy.query_name} query parameter")
    codings = [
        c.strip(" \t").lower() for line in header_lines("Content-Encoding") for c in line.split(",")
    ]
    if any(coding not in ("", "identity") for coding in codings):
        # A gzip body the upstream decodes and reads its key from, while the proxy cannot: taken
        # as "key absent", a route with an optional key would forward it unprotected.
        return KeyProblem(
            "invalid", "the body is content-coded: send it without Content-Encoding to be keyed"
        )
    return _key_from_body(policy.pointer, body)


def unquote_sf_string(raw: str) -> str | None:
    """RFC 8941 sf-string ``"abc"`` -> ``abc``; a bare token stays as it is; None if malformed."""
    if not raw.startswith('"'):
        return raw
    if len(raw) < 2 or not raw.endswith('"'):
        return None
    out: list[str] = []
    chars = iter(raw[1:-1])
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped not in ('"', "\\"):
                return None
            out.append(escaped)
        elif char == '"':
            return None
        else:
            out.append(char)
    return "".join(out)


def _validate(key: str | None, where: str) -> str | KeyProblem:
    if key is None:
        return KeyProblem("invalid", f"{where} is not a valid structured-field string")
    if not key:
        return KeyProblem("invalid", f"{where} is empty")
    if len(key) > MAX_KEY_LENGTH:
        return KeyProblem("invalid", f"{where} is longer than {MAX_KEY_LENGTH} characters")
    if not _VISIBLE_ASCII.fullmatch(key):
        return KeyProblem("invalid", f"{where} has characters outside visible ASCII (0x21-0x7E)")
    return key


# Numbers as exact decimals, so that a body with 1e999999 in it is still JSON.
_BODY_DECODER = msgspec.json.Decoder(float_hook=Decimal)


class _Members(dict[str, object]):
    """A JSON object that remembers which member names it saw twice with different values."""

    __slots__ = ("conflicting",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__()
        self.conflicting: set[str] = set()
        for name, value in pairs:
            if name in self and not _same_json(self[name], value):
                self.conflicting.add(name)
            self[name] = value


def _same_json(first: object, second: object) -> bool:
    """Whether two decoded JSON values are the same value. Python's ``==`` is not that: it
    says ``true == 1``, ``false == 0`` and ``1 == 1.0``, so ``{"client_id": true,
    "client_id": 1}`` read as one key, 1, while an upstream that keeps the first reads true."""
    if type(first) is not type(second):
        return False
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(
            _same_json(value, second[name]) for name, value in first.items()
        )
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(map(_same_json, first, second))
    return first == second


def _may_repeat_a_member(tokens: Sequence[str], body: bytes) -> bool:
    """Whether a member name on the pointer's path may occur twice in ``body``: it must then
    appear twice as a literal JSON string, or be written with escapes."""
    return b"\\" in body or any(
        body.count(json.dumps(token, ensure_ascii=False).encode()) > 1 for token in tokens
    )


def _careful_decode(body: bytes) -> object:
    """The slow decoder: every object a ``_Members`` (RFC 8259 leaves duplicates undefined)."""
    return json.loads(body, object_pairs_hook=_Members, parse_float=Decimal)


def _key_from_body(pointer: str, body: bytes) -> str | KeyProblem:
    where = f"the body field {pointer}"
    tokens = pointer_tokens(pointer)
    try:
        document = _BODY_DECODER.decode(body) if body else None
        if body and _may_repeat_a_member(tokens, body):
            document = _careful_decode(body)
    except (msgspec.DecodeError, RecursionError, ValueError, ArithmeticError):
        return KeyProblem("missing", f"the body is not JSON, so {where} cannot be read")
    value: object = document
    for token in tokens:
        if isinstance(value, _Members) and token in value.conflicting:
            return KeyProblem(
                "invalid", f"{where}: the body names {token!r} twice with different values"
            )
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return KeyProblem("missing", f"send {where}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return KeyProblem("invalid", f"{where} must be a string or an integer")
    return _validate(str(value), where)


def derived_key(request_fingerprint: str) -> str:
    """The key of a ``from: fingerprint`` route for a request that sent none.

    It starts with a NUL, which no valid client key can contain, so the two never collide.
    """
    return "\x00fingerprint:" + request_fingerprint


def if_match_allows(if_match: str, exists: bool, current_etag: str | None) -> bool:
    """RFC 9110 13.1.1 If-Match with strong comparison. ``*`` matches any current resource,
    with an ETag or without one; a listed tag needs the resource's ``current_etag``."""
    if not exists:
        return False
    if if_match.strip() == "*":
        return True
    if current_etag is None or current_etag.startswith("W/"):
        return False  # a weak ETag never matches strongly
    return any(tag.strip() == current_etag for tag in if_match.split(","))


def _length_prefixed(parts: Iterable[bytes]) -> bytes:
    """Join parts so that no two different part lists give the same bytes."""
    return b"".join([len(part).to_bytes(8, "big") + part for part in parts])  # a list: faster


def store_key(prefix: str, scope_values: Iterable[str], key: str) -> str:
    """prefix + sha256 over the credential values and the key; the route is not part of it."""
    parts = [value.encode("utf-8", "surrogateescape") for value in scope_values]
    parts.append(key.encode())
    return prefix + hashlib.sha256(_length_prefixed(parts)).hexdigest()


Pointers = tuple[tuple[str, ...], ...]  # JSON pointers as reference tokens (pointer_tokens)


def canonical_body(body: bytes, ignore: Pointers = ()) -> bytes:
    """JSON compared by value: key order and spacing do not matter. Non-JSON stays as sent.

    ``ignore``: members of a JSON body left out (``fingerprint.ignore``); a raw body keeps them.
    The first byte tags which form follows, so a raw body can never equal a canonical one.
    """
    stripped = body.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            text = body.decode(_json_encoding(body), "surrogatepass")  # as json.loads
            document = _JSON.decode(text)
            if ignore:
                _leave_out(document, ignore)
            return b"J" + _CANONICAL.encode(document)
        # ArithmeticError: a number no decimal can hold (10e999999999999999999)
        except (ValueError, RecursionError, ArithmeticError, msgspec.EncodeError):
            pass  # not JSON, or JSON whose meaning is not clear-cut: compared as sent
    return b"R" + body


def _json_encoding(body: bytes) -> str:
    """``json.detect_encoding(body)``, answered at once for the usual body: a first byte of
    ASCII other than NUL, then none (no BOM starts so, and only NULs there mean UTF-16/32)."""
    if 0 < body[0] < 0x80 and body[1:2] != b"\x00":
        return "utf-8"
    return json.detect_encoding(body)


_ABSENT = object()
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")  # RFC 6901: no leading zeros, no "-"


def _child(value: object, token: str) -> object:
    if isinstance(value, dict):
        return value.get(token, _ABSENT)
    if isinstance(value, list) and _ARRAY_INDEX.fullmatch(token) and int(token) < len(value):
        return value[int(token)]
    return _ABSENT


def _leave_out(document: object, pointers: Pointers) -> None:
    """Remove what each pointer names, all resolved against the body as sent (so removing one
    array element does not shift what another pointer names); an absent target is fine."""
    members: list[tuple[dict[str, object], str]] = []
    elements: dict[int, tuple[list[object], set[int]]] = {}
    for tokens in pointers:
        parent = document
        for token in tokens[:-1]:
            parent = _child(parent, token)
        last = tokens[-1]
        if _child(parent, last) is _ABSENT:
            continue
        if isinstance(parent, dict):
            members.append((parent, last))
        elif isinstance(parent, list):
            elements.setdefault(id(parent), (parent, set()))[1].add(int(last))
    for obj, name in members:
        obj.pop(name, None)
    for array, indices in elements.values():
        for index in sorted(indices, reverse=True):
            del array[index]


# Numbers keep their exact value (0.30000000000000001 is not 0.3), compared by value (1.0 is 1).
_CANONICAL = msgspec.json.Encoder(decimal_format="number", order="sorted")


def _exact_number(literal: str) -> Decimal:
    number = Decimal(literal)
    return number.normalize() if number.is_finite() else number


def _unique_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Duplicate names mean different things to different parsers: keep such bodies raw."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("duplicate names in a JSON object")
    return document


def _not_json(constant: str) -> object:
    """NaN and Infinity are not JSON (RFC 8259 6): Python's decoder takes them, and they
    encode as null, so ``{"a": NaN}``, ``{"a": Infinity}`` and ``{"a": null}`` were the same
    request. Such a body is compared as sent."""
    raise ValueError(f"{constant} is not JSON")


_JSON = json.JSONDecoder(
    parse_float=_exact_number, parse_constant=_not_json, object_pairs_hook=_unique_names
)


def fingerprint(
    policy: FingerprintPolicy,
    method: str,
    path: str,
    query: str,
    headers: Callable[[str], list[str]],
    body: bytes,
) -> str:
    include = policy.include
    parts = [
        method.encode() if "method" in include else b"",
        path.encode("utf-8", "surrogateescape") if "path" in include else b"",
        query.encode("utf-8", "surrogateescape") if "query" in include else b"",
    ]
    if "body" in include:
        parts.append(canonical_body(body, policy.ignore) if policy.json_canonical else body)
    else:
        parts.append(b"")
    for name in policy.headers:
        values = headers(name)
        joined = "\n".join(values).encode("utf-8", "surrogateescape")
        parts.append(name.encode() + b":" + joined)
    return hashlib.sha256(_length_prefixed(parts)).hexdigest()
