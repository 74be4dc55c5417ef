"""What the store keeps for one key, and the codec of the stored response.

A record is plain data: a state, the request fingerprint, the lease token, the creation time and,
once completed, the upstream response as status, header list and body bytes (never a pickled
framework object). The response is encoded with msgpack: compact, binary-safe, fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import msgspec

IN_FLIGHT: Final = "in_flight"
COMPLETED: Final = "completed"
UNREPLAYABLE: Final = "unreplayable"  # completed, but the response was too large to keep


class StoredResponse(msgspec.Struct, array_like=True, frozen=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # The upstream's reason phrase when it is not the standard one (``201 CREATED``); empty
    # (one byte) for the standard phrase. Records written before it existed decode with "",
    # and older proxies ignore the extra trailing element.
    reason: str = ""


_STANDARD_REASONS = {status.value: status.phrase for status in HTTPStatus}


def unusual_reason(status: int, reason: str) -> str:
    """``reason`` unless it is the standard phrase of ``status`` (which costs one byte to keep)."""
    return "" if _STANDARD_REASONS.get(status) == reason else reason


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StoredResponse)


def encode_response(response: StoredResponse) -> bytes:
    return _encoder.encode(response)


def decode_response(data: bytes) -> StoredResponse:
    return _decoder.decode(data)


@dataclass(frozen=True, slots=True)
class Record:
    state: str
    fingerprint: str
    token: str
    created_at: float  # unix seconds
    # Present only for a completed record whose fingerprint matched the one asked about
    # (acquire), or always for a completed record (get): a mismatch must reveal nothing.
    response: StoredResponse | None = None
    expires_in: float | None = None  # seconds; filled by get()
