"""The stored response's codec: compact, and readable across one release either way."""

from __future__ import annotations

import msgspec
import pytest

from idemproxy.records import StoredResponse, decode_response, encode_response, unusual_reason


class ResponseBeforeReasons(msgspec.Struct, array_like=True, frozen=True):
    """The record layout of releases before reason phrases were kept."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def test_a_standard_reason_costs_one_byte_and_an_unusual_one_is_kept() -> None:
    plain = StoredResponse(201, [("Location", "/o/1")], b"{}")
    before = msgspec.msgpack.encode(ResponseBeforeReasons(201, [("Location", "/o/1")], b"{}"))
    assert len(encode_response(plain)) == len(before) + 1
    unusual = StoredResponse(201, [], b"", "CREATED")
    assert decode_response(encode_response(unusual)) == unusual


def test_records_of_the_previous_layout_decode_and_new_ones_decode_there() -> None:
    old = msgspec.msgpack.encode(ResponseBeforeReasons(200, [("A", "1")], b"x"))
    assert decode_response(old) == StoredResponse(200, [("A", "1")], b"x", "")
    new = encode_response(StoredResponse(200, [("A", "1")], b"x", "Fine"))
    assert msgspec.msgpack.decode(new, type=ResponseBeforeReasons) == ResponseBeforeReasons(
        200, [("A", "1")], b"x"
    )


@pytest.mark.parametrize(
    ("status", "reason", "kept"),
    [(201, "Created", ""), (201, "CREATED", "CREATED"), (200, "", ""), (299, "Odd", "Odd")],
)
def test_unusual_reason(status: int, reason: str, kept: str) -> None:
    assert unusual_reason(status, reason) == kept
