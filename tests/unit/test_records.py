"""The stored response's codec: compact, byte-for-byte faithful, and reading the previous one."""

from __future__ import annotations

import random
from email.utils import formatdate

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idemproxy.records import (
    STATIC_HEADERS,
    STATIC_NAMES,
    StoredResponse,
    _date_seconds,
    _imf_fixdate,
    decode_response,
    encode_response,
    unusual_reason,
)


class ResponseBeforeReasons(msgspec.Struct, array_like=True, frozen=True):
    """The response encoding of releases before reason phrases were kept."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class ResponseBeforeCompact(msgspec.Struct, array_like=True, frozen=True):
    """The response encoding of releases before the compact one: plain msgpack."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    reason: str = ""


DATE = "Sun, 06 Dec 2026 00:15:05 GMT"
TYPICAL = StoredResponse(
    200,
    [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Content-Length", "200"),
        ("Date", DATE),
        ("Server", "Python/3.11 aiohttp/3.9.5"),
    ],
    b"x" * 200,
)


def test_a_typical_answer_costs_little_besides_its_body_and_server() -> None:
    encoded = encode_response(TYPICAL)
    assert decode_response(encoded) == TYPICAL
    # format byte, array, status, header list, 1 + 1 (type, length), 1 + 5 (date), 1 + 26
    # (server), 2 + 200 (body): 42 bytes of overhead; plain msgpack took 143.
    assert len(encoded) == 242
    assert len(msgspec.msgpack.encode(TYPICAL)) == 343


def test_a_standard_reason_costs_nothing_and_an_unusual_one_is_kept() -> None:
    plain = StoredResponse(201, [("Location", "/o/1")], b"{}")
    unusual = StoredResponse(201, [("Location", "/o/1")], b"{}", "CREATED")
    assert len(encode_response(unusual)) == len(encode_response(plain)) + len("CREATED") + 1
    assert decode_response(encode_response(unusual)) == unusual
    assert decode_response(encode_response(plain)) == plain


def test_the_encoding_is_pinned() -> None:
    """Stored records name table entries by position: the tables are append-only. A change
    here means records written by a deployed release would replay different headers."""
    response = StoredResponse(
        201,
        [
            ("Content-Length", "2"),
            ("Content-Type", "application/problem+json"),
            ("Date", DATE),
            ("Location", "/o/1"),
            ("X-Odd", "v"),
            ("content-length", "2"),
        ],
        b"{}",
        "Made",
    )
    # 01 format, 94 array of 4, ccc9 201, 99 nine items: 00 (length), 04 (problem+json),
    # 42 ce6b14a909 (Date, its unix time), 46 a42f6f2f31 (Location, "/o/1"), a5582d4f6464 a176
    # ("X-Odd", "v"), 01 (length); c4027b7d the body, a44d616465 "Made"
    assert encode_response(response).hex() == (
        "0194ccc999000442ce6b14a90946a42f6f2f31a5582d4f6464a17601c4027b7da44d616465"
    )
    assert decode_response(encode_response(response)) == response
    assert STATIC_HEADERS[:5] == (
        ("Content-Length", ""),
        ("content-length", ""),
        ("Content-Type", "application/json"),
        ("Content-Type", "application/json; charset=utf-8"),
        ("Content-Type", "application/problem+json"),
    )
    assert STATIC_NAMES[:8] == (
        "Content-Type",
        "Content-Length",
        "Date",
        "Server",
        "Cache-Control",
        "ETag",
        "Location",
        "Set-Cookie",
    )


def test_records_of_the_previous_encodings_decode() -> None:
    old = msgspec.msgpack.encode(ResponseBeforeReasons(200, [("A", "1")], b"x"))
    assert decode_response(old) == StoredResponse(200, [("A", "1")], b"x", "")
    headers = [*TYPICAL.headers, ("Set-Cookie", "a=1"), ("set-cookie", "a=1")]
    before = ResponseBeforeCompact(201, headers, b"x" * 200, "CREATED")
    assert decode_response(msgspec.msgpack.encode(before)) == StoredResponse(
        201, headers, b"x" * 200, "CREATED"
    )


def test_an_unknown_format_is_an_error_not_a_wrong_answer() -> None:
    with pytest.raises(ValueError, match="format"):
        decode_response(b"\x02\x93")


@pytest.mark.parametrize(
    ("header", "compact"),
    [
        (("Content-Length", "2"), True),  # the body's length
        (("Content-Length", "3"), False),  # not the body's length: kept as sent
        (("Content-Length", " 2"), False),
        (("CONTENT-LENGTH", "2"), False),  # other case: kept as sent
        (("Date", DATE), True),
        (("Date", DATE.replace("Sun", "Mon")), False),  # a wrong weekday formats differently
        (("Date", DATE.replace(" 06 ", " 6  ")), False),
        (("Date", DATE.replace("GMT", "UTC")), False),
        (("Date", "Sun, 06 Dec 2026 24:15:05 GMT"), False),
        (("Date", "Thu, 01 Jan 1970 00:00:00 GMT"), True),
        (("Date", "Wed, 31 Dec 1969 23:59:59 GMT"), False),  # before 1970: kept as text
        (("Last-Modified", DATE), True),
        (("X-Date", DATE), False),  # not a date header: kept as text
    ],
)
def test_a_header_is_compacted_only_when_it_decodes_to_the_same_text(
    header: tuple[str, str], compact: bool
) -> None:
    response = StoredResponse(200, [header], b"{}")
    encoded = encode_response(response)
    assert decode_response(encoded) == response
    items = msgspec.msgpack.decode(encoded[1:])[1]
    assert (header[1] not in items) is compact


# Header shapes: names of the tables in any case, duplicates, odd values, latin-1 text.
_names = st.one_of(
    st.sampled_from(STATIC_NAMES),
    st.sampled_from([name for name, _ in STATIC_HEADERS]),
    st.sampled_from(STATIC_NAMES).map(str.upper),
    st.text(
        st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
        min_size=1,
        max_size=20,
    ),
)
_dates = st.integers(-(2**31), 2**33).map(lambda seconds: formatdate(seconds, usegmt=True))


@st.composite
def _responses(draw: st.DrawFn) -> StoredResponse:
    body = draw(st.binary(max_size=300))
    values = st.one_of(
        st.sampled_from([value for _, value in STATIC_HEADERS]),
        st.just(str(len(body))),
        st.integers(0, 1000).map(str),
        _dates,
        _dates.map(str.lower),
        st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
    )
    pairs = st.one_of(st.tuples(_names, values), st.sampled_from(STATIC_HEADERS))
    headers: list[tuple[str, str]] = draw(st.lists(pairs, max_size=12))
    if len(headers) > 0 and draw(st.booleans()):  # duplicates, in another position
        headers.insert(draw(st.integers(0, len(headers))), draw(st.sampled_from(headers)))
    reason = draw(st.one_of(st.just(""), st.text(max_size=20)))
    return StoredResponse(draw(st.integers(100, 999)), headers, body, reason)


@settings(max_examples=500, deadline=None)
@given(_responses())
def test_any_response_replays_exactly(response: StoredResponse) -> None:
    decoded = decode_response(encode_response(response))
    assert decoded == response
    # the same text, not only equal: order, case, duplicates and values as sent
    assert [(n, v) for n, v in decoded.headers] == list(response.headers)
    assert len(encode_response(response)) <= len(msgspec.msgpack.encode(response)) + 1


@pytest.mark.parametrize(
    ("status", "reason", "kept"),
    [(201, "Created", ""), (201, "CREATED", "CREATED"), (200, "", ""), (299, "Odd", "Odd")],
)
def test_unusual_reason(status: int, reason: str, kept: str) -> None:
    assert unusual_reason(status, reason) == kept


def test_stored_dates_format_back_exactly_as_email_utils_does() -> None:
    """The compact encoding keeps an IMF-fixdate as seconds only when it formats back to the
    very same text; its own formatter must agree with the standard library's everywhere."""
    rng = random.Random(18)
    for seconds in [0, 2**32 - 1, 951_782_400, *(rng.randrange(2**32) for _ in range(20_000))]:
        text = formatdate(seconds, usegmt=True)
        assert _imf_fixdate(seconds) == text
        assert _date_seconds(text) == seconds
    for kept_as_text in (
        "Mon, 06 Dec 2026 01:40:00 GMT",  # the wrong weekday
        "Sun, 06 dec 2026 01:40:00 GMT",
        "Sun, 31 Feb 2026 01:40:00 GMT",
        "Sun, 06 Dec 2026 25:40:00 GMT",
        "Sun, +6 Dec 2026 01:40:00 GMT",
        "Sun, 06 Dec 2026 01:40:00 UTC",
    ):
        assert _date_seconds(kept_as_text) is None
