"""idemproxy.response_parser without sockets: bytes in, events out.

Every case is fed twice: in one piece, and one byte at a time (a parser that only works when a
head or a chunk size arrives whole is a parser that breaks on a slow network).
"""

from __future__ import annotations

import pytest

from idemproxy.errors import UpstreamFailure
from idemproxy.response_parser import (
    MAX_HEADER_FIELDS,
    End,
    Event,
    Head,
    ResponseParser,
)


def feed(
    data: bytes, *, head_request: bool = False, by_byte: bool, eof: bool = False
) -> list[Event]:
    parser = ResponseParser()
    parser.expect(head_request)
    events: list[Event] = []
    pieces = [data[i : i + 1] for i in range(len(data))] if by_byte else [data]
    for piece in pieces:
        events += parser.feed(piece)
    if eof:
        events += parser.feed_eof()
    return events


def summary(events: list[Event]) -> tuple[Head, bytes, bool]:
    """The head, the body joined, and whether the response ended."""
    heads = [e for e in events if isinstance(e, Head)]
    assert len(heads) == 1, events
    body = b"".join(e for e in events if isinstance(e, bytes))
    ended = [e for e in events if isinstance(e, End)]
    assert len(ended) <= 1
    if ended:
        assert events[-1] == End()
    return heads[0], body, bool(ended)


BY_BYTE = pytest.mark.parametrize("by_byte", [False, True], ids=["whole", "byte-by-byte"])

FRAMED = [
    (
        "content-length",
        b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        201,
        b"hello",
        True,
    ),
    (
        "chunked-extensions-trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1\r\n \r\nA ; ext\r\n0123456789\r\n0\r\nX-Sum: 42\r\n\r\n",
        200,
        b"hello 0123456789",
        True,
    ),
    (
        "no-body-204-despite-length",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
        204,
        b"",
        True,
    ),
    ("no-body-304", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', 304, b"", True),
    (
        "interim-100-and-103-skipped",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nfinal",
        201,
        b"final",
        True,
    ),
    (
        "http10-without-keep-alive",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        200,
        b"ok",
        False,
    ),
    (
        "http10-keep-alive",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        200,
        b"ok",
        True,
    ),
    (
        "connection-close",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        200,
        b"ok",
        False,
    ),
]


@BY_BYTE
@pytest.mark.parametrize(
    ("name", "data", "status", "body", "keep_alive"), FRAMED, ids=[f[0] for f in FRAMED]
)
def test_framed_responses(
    name: str, data: bytes, status: int, body: bytes, keep_alive: bool, by_byte: bool
) -> None:
    head, got, ended = summary(feed(data, by_byte=by_byte))
    assert (head.status, got, ended, head.keep_alive) == (status, body, True, keep_alive)
    if name == "content-length":
        # header lines as sent: order, case and duplicates kept
        assert head.headers == [
            (b"Set-Cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"Content-Length", b"5"),
        ]
        assert head.reason == "Created"


@BY_BYTE
def test_a_body_until_close_ends_with_the_connection(by_byte: bool) -> None:
    data = b"HTTP/1.1 200 OK\r\n\r\nuntil eof"
    head, body, ended = summary(feed(data, by_byte=by_byte))
    assert (body, ended, head.keep_alive) == (b"until eof", False, False)
    head, body, ended = summary(feed(data, by_byte=by_byte, eof=True))
    assert (body, ended) == (b"until eof", True)


@BY_BYTE
def test_the_answer_to_head_has_no_body_whatever_its_length_says(by_byte: bool) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    head, body, ended = summary(feed(data, head_request=True, by_byte=by_byte))
    assert (head.status, body, ended, head.keep_alive) == (200, b"", True, True)


def test_a_switch_of_protocols_is_not_reusable() -> None:
    head, _, ended = summary(feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", by_byte=False))
    assert (head.status, ended, head.keep_alive) == (101, True, False)


def test_bytes_beyond_the_response_make_the_connection_untrustworthy() -> None:
    parser = ResponseParser()
    parser.expect(False)
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert events[-1] == End()
    assert parser.unexpected_bytes
    assert not parser.in_response
    idle = ResponseParser()
    assert idle.feed(b"HTTP/1.1 200 OK\r\n\r\n") == []  # nobody asked
    assert idle.unexpected_bytes


def test_one_parser_reads_response_after_response() -> None:
    parser = ResponseParser()
    for body in (b"one", b"two"):
        parser.expect(False)
        events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + body)
        assert summary(events)[1:] == (body, True)
    assert not parser.unexpected_bytes


MALFORMED = [
    ("garbage-status-line", b"SURPRISE! not http at all\r\n\r\n"),
    ("http2-status-line", b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("non-numeric-status", b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("status-below-100", b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok"),
    ("header-without-colon", b"HTTP/1.1 200 OK\r\nX-No-Colon\r\nContent-Length: 2\r\n\r\nok"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok"),
    ("bare-cr-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok"),
    ("bare-lf-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\nb\r\nContent-Length: 2\r\n\r\nok"),
    (
        "conflicting-content-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ),
    ("signed-content-length", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
    (
        "length-and-chunked",
        b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
    ),
    (
        "bad-chunk-size",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    ),
    (
        "chunk-data-overrun",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n0\r\n\r\n",
    ),
    (
        "chunk-size-overflow",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000002\r\nok\r\n",
    ),
    (
        "too-many-fields",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADER_FIELDS + 1))
        + b"\r\n",
    ),
    ("head-over-64k", b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (65 * 1024) + b"\r\n\r\n"),
]


@BY_BYTE
@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_answers_are_broken(name: str, data: bytes, by_byte: bool) -> None:
    with pytest.raises(UpstreamFailure) as caught:
        feed(data, by_byte=by_byte)
    assert caught.value.kind == "broken"
    assert b"ok" not in str(caught.value).encode()  # a reason, not the bytes refused


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
    ids=["mid-length-body", "mid-chunked-body", "mid-head", "before-answering"],
)
def test_a_close_before_the_end_is_broken(data: bytes) -> None:
    with pytest.raises(UpstreamFailure) as caught:
        feed(data, by_byte=False, eof=True)
    assert caught.value.kind == "broken"


def test_exactly_the_field_limit_is_fine() -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADER_FIELDS - 1))
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"
    head, _, ended = summary(feed(data, by_byte=False))
    assert (len(head.headers), ended) == (MAX_HEADER_FIELDS, True)
