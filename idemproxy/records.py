"""What the store keeps for one key, and the codec of the stored response.

A record is plain data: a state, the request fingerprint, the lease token, the creation time and,
once completed, the upstream response as status, header list and body bytes (never a pickled
framework object).

The response is encoded compactly (``encode_response``): a format byte ``0x01`` and a msgpack
array ``[status, headers, body]`` (``reason`` appended only when it is not empty). ``headers`` is
one flat list that keeps the answer's order, case and duplicates:

- an int below 64: a whole header from ``STATIC_HEADERS`` (``Content-Type: application/json``);
  entries 0 and 1 are ``Content-Length`` / ``content-length`` whose value is the body's length;
- an int from 64: the name ``STATIC_NAMES[n - 64]``, then its value;
- a str: a name, then its value;
- a value is a str, or an int: the unix time of an IMF-fixdate (``Sun, 06 Dec 2026 00:15:05
  GMT``) that formats back to exactly that text.

A 200-byte answer with ``Content-Type``, ``Content-Length``, ``Date`` and ``Server`` costs 45 bytes
besides its body and ``Server`` value, instead of about 110. Both tables are append-only: stored
records name entries by position. Records of the previous encoding (a msgpack array
``[status, headers, body, reason?]`` starting with 0x93 or 0x94) still decode.
"""

from __future__ import annotations

import calendar
import functools
import time
from http import HTTPStatus
from typing import Any, Final

import msgspec

IN_FLIGHT: Final = "in_flight"
COMPLETED: Final = "completed"
UNREPLAYABLE: Final = "unreplayable"  # completed, but the response was too large to keep


class StoredResponse(msgspec.Struct, array_like=True, frozen=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # The upstream's reason phrase when it is not the standard one (``201 CREATED``); empty
    # for the standard phrase, and then left out of the encoding.
    reason: str = ""


_STANDARD_REASONS = {status.value: status.phrase for status in HTTPStatus}


def unusual_reason(status: int, reason: str) -> str:
    """``reason`` unless it is the standard phrase of ``status`` (which costs nothing to keep)."""
    return "" if _STANDARD_REASONS.get(status) == reason else reason


# Append-only (stored records refer to entries by position; tests/unit/test_records.py pins
# them). Exact spelling and case: a header matches only when it is byte for byte the same.
STATIC_HEADERS: Final[tuple[tuple[str, str], ...]] = (
    ("Content-Length", ""),  # its value: the body's length
    ("content-length", ""),  # its value: the body's length
    ("Content-Type", "application/json"),
    ("Content-Type", "application/json; charset=utf-8"),
    ("Content-Type", "application/problem+json"),
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Type", "text/plain"),
    ("Content-Type", "text/html"),
    ("Content-Type", "application/octet-stream"),
    ("Content-Type", "application/xml"),
    ("content-type", "application/json"),
    ("content-type", "application/json; charset=utf-8"),
    ("content-type", "application/problem+json"),
    ("content-type", "text/plain; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("Cache-Control", "no-store"),
    ("Cache-Control", "private"),
    ("Cache-Control", "no-cache, no-store, must-revalidate"),
    ("Cache-Control", "max-age=0, private, must-revalidate"),
    ("Pragma", "no-cache"),
    ("Expires", "0"),
    ("Vary", "Accept-Encoding"),
    ("Vary", "Origin"),
    ("Vary", "Accept"),
    ("Accept-Ranges", "bytes"),
    ("Content-Encoding", "gzip"),
    ("Content-Encoding", "br"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("X-Frame-Options", "SAMEORIGIN"),
    ("X-XSS-Protection", "0"),
    ("X-XSS-Protection", "1; mode=block"),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Credentials", "true"),
    ("Referrer-Policy", "no-referrer"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
    ("Strict-Transport-Security", "max-age=31536000"),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
    ("Server", "nginx"),
    ("Server", "cloudflare"),
    ("Server", "gunicorn"),
    ("Server", "uvicorn"),
    ("Server", "Werkzeug"),
    ("X-Powered-By", "Express"),
    ("server", "nginx"),
    ("vary", "Accept-Encoding"),
    ("x-content-type-options", "nosniff"),
)
STATIC_NAMES: Final[tuple[str, ...]] = (
    "Content-Type",
    "Content-Length",
    "Date",
    "Server",
    "Cache-Control",
    "ETag",
    "Location",
    "Set-Cookie",
    "Vary",
    "Last-Modified",
    "Expires",
    "Content-Encoding",
    "Content-Language",
    "Content-Disposition",
    "Age",
    "Link",
    "Retry-After",
    "WWW-Authenticate",
    "Access-Control-Allow-Origin",
    "Access-Control-Expose-Headers",
    "Strict-Transport-Security",
    "Content-Security-Policy",
    "X-Request-Id",
    "X-Request-ID",
    "X-Correlation-Id",
    "Request-Id",
    "X-Trace-Id",
    "Traceparent",
    "Idempotency-Key",
    "Idempotent-Replayed",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
    "X-Powered-By",
    "Via",
    "Alt-Svc",
    "Report-To",
    "NEL",
    "Content-Range",
    "content-type",
    "content-length",
    "date",
    "server",
    "cache-control",
    "etag",
    "location",
    "set-cookie",
    "vary",
    "last-modified",
    "expires",
    "x-request-id",
    "x-powered-by",
    "via",
    "alt-svc",
)
_NAME_BASE: Final = 64
_FORMAT: Final = b"\x01"
_OLD_FORMATS: Final = (0x93, 0x94)  # msgpack fixarray of 3 or 4: the previous encoding

assert len(STATIC_HEADERS) <= _NAME_BASE
assert _NAME_BASE + len(STATIC_NAMES) <= 128  # one byte each: msgpack positive fixints
_PAIR_CODES = {pair: code for code, pair in enumerate(STATIC_HEADERS) if code > 1}
_NAME_CODES = {name: _NAME_BASE + code for code, name in enumerate(STATIC_NAMES)}
_LENGTH_CODES = {"Content-Length": 0, "content-length": 1}
# Headers whose values are often IMF-fixdates; other names keep their value as text.
_DATE_NAMES = frozenset({"Date", "date", "Last-Modified", "last-modified", "Expires", "expires"})


_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
# Index 0 unused: months count from 1, as time.struct_time.tm_mon does.
# fmt: off
_MONTHS: Final = (
    "", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
)
# fmt: on
_MONTH_NUMBERS: Final = {name: number for number, name in enumerate(_MONTHS) if name}


# Both date conversions are cached: the answers stored and replayed within a second or so carry
# the same few Date values, and each conversion costs microseconds (pure functions of the value).
@functools.lru_cache(maxsize=256)
def _imf_fixdate(seconds: int) -> str:
    """``Sun, 06 Dec 2026 01:40:00 GMT``: what ``email.utils.formatdate(seconds, usegmt=True)``
    makes, in a quarter of its time (every replay of a stored Date header formats one)."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _date_seconds(value: str) -> int | None:
    """The unix time of an IMF-fixdate that formats back to exactly ``value``, else None."""
    if len(value) != 29 or not value.endswith(" GMT"):
        return None
    return _fixdate_seconds(value)


@functools.lru_cache(maxsize=256)
def _fixdate_seconds(value: str) -> int | None:
    """``_date_seconds`` of a value of the right shape (cached: only 29 characters each)."""
    try:
        seconds = calendar.timegm(
            (
                int(value[12:16]),
                _MONTH_NUMBERS[value[8:11]],
                int(value[5:7]),
                int(value[17:19]),
                int(value[20:22]),
                int(value[23:25]),
                0,
                0,
                0,
            )
        )
    except (KeyError, ValueError, OverflowError):
        return None
    # Exactly what it formats back to, or kept as text: the parse above may be lenient.
    return seconds if 0 <= seconds < 2**32 and _imf_fixdate(seconds) == value else None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
_old_decoder = msgspec.msgpack.Decoder(StoredResponse)


def encode_response(response: StoredResponse) -> bytes:
    length = str(len(response.body))
    items: list[str | int] = []
    for name, value in response.headers:
        code = _PAIR_CODES.get((name, value))
        if code is not None:
            items.append(code)
            continue
        if value == length and name in _LENGTH_CODES:
            items.append(_LENGTH_CODES[name])
            continue
        items.append(_NAME_CODES.get(name, name))
        seconds = _date_seconds(value) if name in _DATE_NAMES else None
        items.append(value if seconds is None else seconds)
    fields: list[Any] = [response.status, items, response.body]
    if response.reason:
        fields.append(response.reason)
    return _FORMAT + _encoder.encode(fields)


def decode_response(data: bytes) -> StoredResponse:
    if data[0] in _OLD_FORMATS:
        return _old_decoder.decode(data)
    if data[:1] != _FORMAT:
        raise ValueError(f"unknown stored response format {data[:1]!r}")
    status, items, body, *reason = _decoder.decode(memoryview(data)[1:])
    headers: list[tuple[str, str]] = []
    i, count = 0, len(items)
    while i < count:
        item = items[i]
        if isinstance(item, int) and item < _NAME_BASE:
            name, value = STATIC_HEADERS[item]
            headers.append((name, value if item > 1 else str(len(body))))
            i += 1
            continue
        name = STATIC_NAMES[item - _NAME_BASE] if isinstance(item, int) else item
        value = items[i + 1]
        headers.append((name, _imf_fixdate(value) if isinstance(value, int) else value))
        i += 2
    return StoredResponse(status, headers, body, reason[0] if reason else "")


# A msgspec Struct, not a frozen dataclass: as immutable, and made in a tenth of the time (a
# frozen dataclass sets each field through object.__setattr__); one is made per replay.
class Record(msgspec.Struct, frozen=True):
    state: str
    fingerprint: str
    token: str
    created_at: float  # unix seconds
    # Present only for a completed record whose fingerprint matched the one asked about
    # (acquire), or always for a completed record (get): a mismatch must reveal nothing.
    response: StoredResponse | None = None
    expires_in: float | None = None  # seconds; filled by get()
