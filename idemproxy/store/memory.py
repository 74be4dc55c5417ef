"""The embedded default store: one process, nothing shared, nothing kept across restarts.

Expiry is lazy plus a heap: each call first drops the entries whose deadline has passed, so
memory follows the live keys without a sweeper task. Every method runs without an await, which
on one event loop makes each state change atomic.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

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


@dataclass(slots=True)
class _Entry:
    state: str
    fingerprint: str
    token: str
    created_at: float
    deadline: float  # time.monotonic()
    # Kept encoded: one bytes object takes a third of the memory of the decoded objects.
    response: bytes | None = None


def _size(key: str, entry: _Entry) -> int:
    """What an entry counts against ``max_bytes``: its key, fingerprint, token and response."""
    response = len(entry.response) if entry.response is not None else 0
    return len(key) + len(entry.fingerprint) + len(entry.token) + response


class MemoryStore:
    """``max_keys`` and ``max_bytes`` bound memory: at either bound, a new key (or a completion
    that brings a response) evicts the completed records that would expire first. In-flight
    leases are never evicted; when nothing else is left, new keys are refused as "store
    unavailable" (503 under ``fail_closed``) and a completion is retried like one made while a
    store is down. ``max_bytes`` counts the stored response bytes and the keys (key,
    fingerprint and token strings), not Python's fixed cost per entry (bounded by ``max_keys``).
    """

    def __init__(self, max_keys: int = 1_000_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.bytes = 0  # the sum of _size() over the entries
        self._entries: dict[str, _Entry] = {}
        self._deadlines: list[tuple[float, str]] = []

    def _drop(self, key: str) -> None:
        self.bytes -= _size(key, self._entries.pop(key))

    def _expire(self) -> None:
        now = time.monotonic()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.deadline <= now:
                self._drop(key)

    def _evict_one(self) -> None:
        heap = self._deadlines
        leases: list[tuple[float, str]] = []
        try:
            while heap:
                deadline, key = heapq.heappop(heap)
                entry = self._entries.get(key)
                if entry is None or entry.deadline != deadline:
                    continue  # a stale heap item: renewed, completed or gone since
                if entry.state == IN_FLIGHT:
                    leases.append((deadline, key))
                    continue
                self._drop(key)
                return
        finally:
            for item in leases:
                heapq.heappush(heap, item)
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

    def _live(self, key: str) -> _Entry | None:
        self._expire()
        return self._entries.get(key)

    def _set_deadline(self, key: str, entry: _Entry, seconds: float) -> None:
        entry.deadline = time.monotonic() + seconds
        heapq.heappush(self._deadlines, (entry.deadline, key))

    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        entry = self._live(key)
        if entry is None:
            entry = _Entry(IN_FLIGHT, fingerprint, token, time.time(), 0.0)
            size = _size(key, entry)
            self._make_room(1, size)
            self._entries[key] = entry
            self.bytes += size
            self._set_deadline(key, entry, lock_ttl)
            return None
        if entry.state == IN_FLIGHT and entry.token == token:
            return None
        same = entry.state == COMPLETED and entry.fingerprint == fingerprint
        return Record(
            entry.state,
            entry.fingerprint,
            entry.token,
            entry.created_at,
            decode_response(entry.response) if same and entry.response else None,
        )

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        entry = self._live(key)
        if entry is None or entry.state != IN_FLIGHT or entry.token != token:
            return False
        self._set_deadline(key, entry, lock_ttl)
        return True

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        entry = self._live(key)
        if entry is None or entry.token != token:
            return False
        state = COMPLETED if response is not None else UNREPLAYABLE
        if entry.state != IN_FLIGHT:
            return entry.state == state  # a retried completion
        encoded = encode_response(response) if response is not None else None
        if encoded is not None:
            self._make_room(0, len(encoded))  # never evicts this entry: it is a lease
        entry.state = state
        entry.response = encoded
        self.bytes += len(encoded) if encoded is not None else 0
        self._set_deadline(key, entry, ttl)
        return True

    async def release(self, key: str, token: str) -> bool:
        entry = self._live(key)
        if entry is None or entry.state != IN_FLIGHT or entry.token != token:
            return False
        self._drop(key)
        return True

    async def get(self, key: str) -> Record | None:
        entry = self._live(key)
        if entry is None:
            return None
        return Record(
            entry.state,
            entry.fingerprint,
            entry.token,
            entry.created_at,
            decode_response(entry.response) if entry.response else None,
            max(0.0, entry.deadline - time.monotonic()),
        )

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
        self._deadlines.clear()
        self.bytes = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)
