"""The embedded default store: one process, nothing shared, nothing kept across restarts.

Expiry needs no sweeper task: each call first drops the entries whose deadline has passed (whole
buckets of deadlines, then the head of the current second's bucket), so memory follows the live
keys. Every method runs without an await, which on one event loop makes each state change
atomic.

Layout. Nothing stored per key is a container the cyclic garbage collector walks: a key maps to
one ``bytes`` value (state, flags, created_at, deadline, fingerprint, token, encoded response),
and the expiry indexes are a ``bytearray`` log per second of deadline. The dicts holding them
have only str, int, bytes, bytearray and float in them, which CPython leaves untracked, so a
full collection costs the same at a thousand keys as at a million (a per-key dataclass and a
heap of tuples made every full collection walk every key: p99 grew with the key count).
"""

from __future__ import annotations

import math
import struct
import time
from array import array
from bisect import bisect_left, insort
from collections.abc import Iterator
from typing import Final

from idemproxy.errors import StoreUnavailable
from idemproxy.records import (
    COMPLETED,
    IN_FLIGHT,
    UNREPLAYABLE,
    Record,
    StoredResponse,
    decode_response,
    encode_response,
)

_STATES: Final = (IN_FLIGHT, COMPLETED, UNREPLAYABLE)
_IN_FLIGHT: Final = 0
_COMPLETED: Final = 1
_UNREPLAYABLE: Final = 2

# One entry: state code, flags, created_at (unix seconds), deadline (time.monotonic()), the
# fingerprint's and the token's byte lengths; then the fingerprint, the token and, for a
# completed record that kept its answer, the encoded response up to the end.
_ENTRY: Final = struct.Struct("<BBddII")
_HEX_FINGERPRINT: Final = 1  # flag: the fingerprint is 64 lowercase hex digits, kept as 32 bytes
_DEADLINE_AT: Final = 10  # the offset of the deadline in _ENTRY
_DEADLINE: Final = struct.Struct("<d")

# One record of a bucket's log: the deadline the key had when it was written, the key's length
# and the key (UTF-8, surrogates passed through). A record whose deadline is no longer its key's
# is stale (renewed, completed or gone since) and is skipped.
_RECORD: Final = struct.Struct("<dI")
_UTF8: Final = "utf-8"
_ERRORS: Final = "surrogatepass"  # any str round-trips, exactly as given


def _pack_fingerprint(fingerprint: str) -> tuple[int, bytes]:
    if len(fingerprint) == 64:
        try:
            packed = bytes.fromhex(fingerprint)
        except ValueError:
            pass
        else:
            if packed.hex() == fingerprint:  # lowercase, no spaces: the form keys.py makes
                return _HEX_FINGERPRINT, packed
    return 0, fingerprint.encode(_UTF8, _ERRORS)


def _entry(
    state: int,
    fingerprint: str,
    token: str,
    created_at: float,
    deadline: float,
    response: bytes = b"",
) -> bytes:
    flags, fp = _pack_fingerprint(fingerprint)
    tok = token.encode(_UTF8, _ERRORS)
    head = _ENTRY.pack(state, flags, created_at, deadline, len(fp), len(tok))
    return b"".join((head, fp, tok, response))


def _with(value: bytes, state: int, deadline: float, response: bytes = b"") -> bytes:
    """An in-flight ``value`` with a new state, deadline and response."""
    _, flags, created_at, _, fp_len, tok_len = _ENTRY.unpack_from(value)
    end = _ENTRY.size + fp_len + tok_len
    head = _ENTRY.pack(state, flags, created_at, deadline, fp_len, tok_len)
    return b"".join((head, memoryview(value)[_ENTRY.size : end], response))


def _deadline(value: bytes) -> float:
    deadline: float = _DEADLINE.unpack_from(value, _DEADLINE_AT)[0]
    return deadline


def _record(value: bytes, response: bool, expires_in: float | None = None) -> Record:
    state, flags, created_at, _, fp_len, tok_len = _ENTRY.unpack_from(value)
    start = _ENTRY.size
    fp = value[start : start + fp_len]
    fingerprint = fp.hex() if flags & _HEX_FINGERPRINT else fp.decode(_UTF8, _ERRORS)
    start += fp_len
    token = value[start : start + tok_len].decode(_UTF8, _ERRORS)
    start += tok_len
    body = value[start:] if response and len(value) > start else None
    return Record(
        _STATES[state],
        fingerprint,
        token,
        created_at,
        decode_response(body) if body else None,
        expires_in,
    )


def _fingerprint_is(value: bytes, fingerprint: str) -> bool:
    _, flags, _, _, fp_len, _ = _ENTRY.unpack_from(value)
    fp = value[_ENTRY.size : _ENTRY.size + fp_len]
    if flags & _HEX_FINGERPRINT:
        return fp.hex() == fingerprint
    return fp == fingerprint.encode(_UTF8, _ERRORS)


def _token_is(value: bytes, token: str) -> bool:
    _, _, _, _, fp_len, tok_len = _ENTRY.unpack_from(value)
    tok = token.encode(_UTF8, _ERRORS)
    return len(tok) == tok_len and value.startswith(tok, _ENTRY.size + fp_len)


def _records(log: bytearray | bytes) -> Iterator[tuple[int, float, str]]:
    """(offset after the record, deadline, key) for every record of a bucket's log."""
    offset = 0
    end = len(log)
    while offset < end:
        deadline, size = _RECORD.unpack_from(log, offset)
        start = offset + _RECORD.size
        offset = start + size
        yield offset, deadline, log[start:offset].decode(_UTF8, _ERRORS)


def _log_record(deadline: float, key: str) -> bytes:
    raw = key.encode(_UTF8, _ERRORS)
    return _RECORD.pack(deadline, len(raw)) + raw


class _Index:
    """Deadline buckets: the whole second of a deadline -> a log of the records written with a
    deadline in that second. ``last`` holds, for a bucket whose records are in deadline order,
    the last deadline written to it, and -1.0 for one that is not (sorted when it is needed).
    ``due`` is at most the earliest deadline of a record: until then, nothing is to expire."""

    __slots__ = ("due", "last", "logs", "seconds")

    def __init__(self) -> None:
        self.logs: dict[int, bytearray] = {}
        self.last: dict[int, float] = {}
        self.seconds: array[int] = array("q")  # the buckets' seconds, ascending
        self.due = math.inf

    def add(self, key: str, deadline: float) -> None:
        self.due = min(self.due, deadline)
        second = int(deadline)
        log = self.logs.get(second)
        if log is None:
            self.logs[second] = bytearray(_log_record(deadline, key))
            self.last[second] = deadline
            insort(self.seconds, second)
            return
        log += _log_record(deadline, key)
        last = self.last[second]
        if last >= 0.0:
            self.last[second] = deadline if deadline >= last else -1.0

    def remove(self, second: int) -> None:
        del self.logs[second]
        del self.last[second]
        seconds = self.seconds
        if seconds[0] == second:
            del seconds[0]
        else:
            del seconds[bisect_left(seconds, second)]

    def clear(self) -> None:
        self.logs.clear()
        self.last.clear()
        del self.seconds[:]
        self.due = math.inf


class MemoryStore:
    """``max_keys`` and ``max_bytes`` bound memory: at either bound, a new key (or a completion
    that brings a response) evicts the completed records that would expire first. In-flight
    leases are never evicted; when nothing else is left, new keys are refused as "store
    unavailable" (503 under ``fail_closed``) and a completion is retried like one made while a
    store is down. ``max_bytes`` counts, per key, the key's characters and the bytes of its
    packed entry: a 26-byte header, the fingerprint (32 bytes for a sha256 hex digest), the
    token and the stored response. Python's fixed cost per entry is not counted (it is bounded
    by ``max_keys``).

    Expiry is exact: every call drops the buckets whose second has passed and, from the head of
    the current second's buckets (in deadline order), the records whose deadline has passed.
    Leases and completed records have an index each, so that eviction, which takes the head of
    the completed index, never walks past leases.
    """

    def __init__(self, max_keys: int = 1_000_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.bytes = 0  # the sum of _size() over the entries
        self._entries: dict[str, bytes] = {}
        self._leases = _Index()
        self._done = _Index()  # completed records, replayable or not

    # --- the byte count and the expiry indexes ----------------------------------------------

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key) + len(value)

    def _drop(self, key: str) -> None:
        self.bytes -= self._size(key, self._entries.pop(key))

    def _live_record(self, key: str, deadline: float) -> bytes | None:
        value = self._entries.get(key)
        if value is None or _deadline(value) != deadline:
            return None  # a stale record: renewed, completed or gone since
        return value

    def _sorted(self, index: _Index, second: int) -> bytearray | None:
        """The bucket's log in deadline order, without stale records; None when none is left."""
        log = index.logs[second]
        if index.last[second] >= 0.0:
            return log
        live: dict[str, float] = {}
        for _, deadline, key in _records(log):
            if self._live_record(key, deadline) is not None:
                live[key] = deadline
        if not live:
            index.remove(second)
            return None
        order = sorted(live, key=live.__getitem__)
        log = bytearray(b"".join(_log_record(live[key], key) for key in order))
        index.logs[second] = log
        index.last[second] = live[order[-1]]
        return log

    def _expire_index(self, index: _Index, now: float) -> None:
        seconds = index.seconds
        while seconds and seconds[0] + 1 <= now:  # the whole second has passed
            second = seconds[0]
            for _, deadline, key in _records(index.logs[second]):
                if self._live_record(key, deadline) is not None:
                    self._drop(key)
            index.remove(second)
        index.due = seconds[0] if seconds else math.inf
        if index.due > now:
            return
        second = seconds[0]  # the current second: its head, up to the first deadline to come
        log = self._sorted(index, second)
        if log is None:
            index.due = seconds[0] if seconds else math.inf
            return
        consumed = 0
        for offset, deadline, key in _records(log):
            if deadline > now:
                index.due = deadline
                break
            if self._live_record(key, deadline) is not None:
                self._drop(key)
            consumed = offset
        if consumed:
            del log[:consumed]  # cheap: a bytearray drops its head by moving its start
            if not log:
                index.remove(second)
                index.due = seconds[0] if seconds else math.inf

    def _expire(self) -> None:
        now = time.monotonic()
        if self._leases.due <= now:
            self._expire_index(self._leases, now)
        if self._done.due <= now:
            self._expire_index(self._done, now)

    def _evict_one(self) -> None:
        """Drop the completed record that expires first, or raise."""
        index = self._done
        while index.seconds:
            second = index.seconds[0]
            log = self._sorted(index, second)
            if log is None:
                continue
            consumed = 0
            dropped = False
            for offset, deadline, key in _records(log):
                consumed = offset
                value = self._live_record(key, deadline)
                if value is not None and value[0] != _IN_FLIGHT:
                    self._drop(key)
                    dropped = True
                    break
            del log[:consumed]
            if not log:
                index.remove(second)
            if dropped:
                return
        raise StoreUnavailable(
            f"the memory store is full of in-flight leases ({len(self._entries)} keys, "
            f"{self.bytes} bytes)"
        )

    def _make_room(self, keys: int, size: int) -> None:
        """Evict until ``keys`` more entries and ``size`` more bytes fit."""
        while self._entries and (
            len(self._entries) + keys > self.max_keys or self.bytes + size > self.max_bytes
        ):
            self._evict_one()

    def _live(self, key: str) -> bytes | None:
        self._expire()
        return self._entries.get(key)

    def _put(self, key: str, value: bytes, deadline: float) -> None:
        self._entries[key] = value
        (self._leases if value[0] == _IN_FLIGHT else self._done).add(key, deadline)

    # --- the Store protocol -----------------------------------------------------------------

    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        value = self._live(key)
        if value is None:
            deadline = time.monotonic() + lock_ttl
            value = _entry(_IN_FLIGHT, fingerprint, token, time.time(), deadline)
            size = self._size(key, value)
            self._make_room(1, size)
            self._put(key, value, deadline)
            self.bytes += size
            return None
        if value[0] == _IN_FLIGHT and _token_is(value, token):
            return None
        same = value[0] == _COMPLETED and _fingerprint_is(value, fingerprint)
        return _record(value, same)

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        value = self._live(key)
        if value is None or value[0] != _IN_FLIGHT or not _token_is(value, token):
            return False
        deadline = time.monotonic() + lock_ttl
        self._put(key, _with(value, _IN_FLIGHT, deadline), deadline)
        return True

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        value = self._live(key)
        if value is None or not _token_is(value, token):
            return False
        encoded = encode_response(response) if response is not None else b""
        if self._size(key, value) + len(encoded) > self.max_bytes:
            # It could never fit, not even alone: evicting every other record would not make
            # room, and retrying would hold the lease until it expires and the request runs
            # again. Kept like an answer over max_stored_response: 409 to every retry.
            encoded = b""
        state = _COMPLETED if encoded else _UNREPLAYABLE
        if value[0] != _IN_FLIGHT:
            return value[0] == state  # a retried completion
        if encoded:
            self._make_room(0, len(encoded))  # never evicts this entry: it is a lease
        deadline = time.monotonic() + ttl
        self._put(key, _with(value, state, deadline, encoded), deadline)
        self.bytes += len(encoded)
        return True

    async def release(self, key: str, token: str) -> bool:
        value = self._live(key)
        if value is None or value[0] != _IN_FLIGHT or not _token_is(value, token):
            return False
        self._drop(key)
        return True

    async def get(self, key: str) -> Record | None:
        value = self._live(key)
        if value is None:
            return None
        return _record(value, True, max(0.0, _deadline(value) - time.monotonic()))

    async def delete(self, key: str) -> bool:
        if self._live(key) is None:
            return False
        self._drop(key)
        return True

    async def ping(self) -> None:
        return None

    async def ready(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._leases.clear()
        self._done.clear()
        self.bytes = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)
