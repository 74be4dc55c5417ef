"""The memory store's own layout: what the store contract cannot see.

A fake clock drives expiry (the store reads ``time.monotonic`` and ``time.time`` through its
module's ``time``), and coroutines are run by hand (no method awaits), so every step is exact.
The last test runs random operation sequences against a small reference model: a dict of plain
records, expiry by a full scan, eviction by ``min`` over the completed records.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest

import idemproxy.store.memory as memory
from idemproxy.errors import StoreUnavailable
from idemproxy.records import (
    COMPLETED,
    IN_FLIGHT,
    UNREPLAYABLE,
    Record,
    StoredResponse,
    encode_response,
)
from idemproxy.store.memory import MemoryStore

T = TypeVar("T")
RESPONSE = StoredResponse(201, [("Location", "/orders/1")], b'{"id":1}')
FP = hashlib.sha256(b"a").hexdigest()
OTHER_FP = hashlib.sha256(b"b").hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 5000.25

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(memory, "time", fake)
    return fake


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    raise AssertionError("the memory store awaited")


def completed(store: MemoryStore, key: str, ttl: float, fp: str = FP, holder: str = "t") -> None:
    assert run(store.acquire(key, fp, holder, 30.0)) is None
    assert run(store.complete(key, holder, RESPONSE, ttl))


def body(size: int) -> StoredResponse:
    return StoredResponse(200, [], b"x" * size)


# --- the layout -------------------------------------------------------------------------------


def test_no_stored_key_is_an_object_the_collector_walks(clock: Clock) -> None:
    store = MemoryStore()
    gc.collect()
    before = len(gc.get_objects())
    keys = [f"idem:{i:064x}" for i in range(5000)]
    for i, key in enumerate(keys):
        assert run(store.acquire(key, FP, f"tok-{i}", 3600.0)) is None
        if i % 2:
            assert run(store.complete(key, f"tok-{i}", RESPONSE, 3600.0))
        clock.now += 0.01  # deadlines over many buckets
    gc.collect()
    assert len(gc.get_objects()) - before < 50  # the keys list and a few buckets' worth at most
    assert not gc.is_tracked(store._entries)
    assert len(store) == 5000


@pytest.mark.parametrize(
    ("fingerprint", "token"),
    [
        (FP, "0123456789abcdef-42"),
        (FP.upper(), "t"),  # hex, but not the lowercase form: kept as text, returned as given
        (" " + FP[1:], "t"),  # fromhex would skip the space
        ("", ""),
        ("caf\u00e9 \udc80", "\ud800-token"),  # non-ASCII and lone surrogates
        ("f" * 300, "t" * 70_000),
    ],
)
def test_fingerprints_and_tokens_come_back_exactly_as_given(
    clock: Clock, fingerprint: str, token: str
) -> None:
    store = MemoryStore()
    key = "k\udc80" + "x" * 300  # long, and not valid UTF-8 as is
    assert run(store.acquire(key, fingerprint, token, 30.0)) is None
    record = run(store.get(key))
    assert record is not None
    assert (record.fingerprint, record.token) == (fingerprint, token)
    assert run(store.acquire(key, fingerprint, token, 30.0)) is None  # the same token: acquired
    assert run(store.complete(key, token, RESPONSE, 60.0))
    replay = run(store.acquire(key, fingerprint, "other", 30.0))
    assert replay == Record(COMPLETED, fingerprint, token, clock.time(), RESPONSE)
    mismatch = run(store.acquire(key, fingerprint + "x", "other", 30.0))
    assert mismatch is not None
    assert mismatch.response is None


def test_a_sha256_fingerprint_is_kept_in_32_bytes(clock: Clock) -> None:
    store = MemoryStore()
    run(store.acquire("a", FP, "t", 30.0))
    run(store.acquire("b", FP.upper(), "t", 30.0))
    assert store._size("a", store._entries["a"]) + 32 == store._size("b", store._entries["b"])


def test_max_bytes_counts_the_key_and_the_packed_entry(clock: Clock) -> None:
    store = MemoryStore()
    run(store.acquire("key", FP, "token", 30.0))
    header = memory._ENTRY.size
    assert store.bytes == 3 + header + 32 + 5
    run(store.complete("key", "token", RESPONSE, 60.0))
    assert store.bytes == 3 + header + 32 + 5 + len(encode_response(RESPONSE))


# --- expiry -----------------------------------------------------------------------------------


def test_expiry_is_exact_within_a_second(clock: Clock) -> None:
    store = MemoryStore()
    run(store.acquire("a", FP, "t", 0.2))
    run(store.acquire("b", FP, "t", 0.4))
    clock.now += 0.2
    assert len(store) == 1  # a deadline at now has passed
    assert run(store.get("a")) is None
    record = run(store.get("b"))
    assert record is not None
    assert record.expires_in == pytest.approx(0.2)
    clock.now += 0.2
    assert len(store) == 0
    assert store.bytes == 0


def test_a_renewed_lease_outlives_its_first_deadline(clock: Clock) -> None:
    store = MemoryStore()
    run(store.acquire("k", FP, "t", 1.0))
    clock.now += 0.9
    assert run(store.renew("k", "t", 5.0))
    clock.now += 2.0  # past the first deadline's bucket: its record is stale
    assert run(store.renew("k", "t", 5.0))
    assert run(store.renew("k", "other", 5.0)) is False
    clock.now += 4.9
    record = run(store.get("k"))
    assert record is not None
    assert record.state == IN_FLIGHT
    clock.now += 0.1
    assert run(store.get("k")) is None
    assert store.bytes == 0


def test_a_key_taken_again_after_it_expired_is_not_dropped_by_its_old_deadline(
    clock: Clock,
) -> None:
    store = MemoryStore()
    completed(store, "k", 1.0)
    clock.now += 1.5
    assert run(store.acquire("k", FP, "t2", 0.7)) is None  # in the same bucket as before
    clock.now += 0.6
    record = run(store.get("k"))
    assert record is not None
    assert record.token == "t2"
    assert len(store) == 1


# --- eviction ---------------------------------------------------------------------------------


def test_eviction_takes_the_completed_record_expiring_first_within_one_second(
    clock: Clock,
) -> None:
    store = MemoryStore(max_keys=4)
    # Written out of deadline order into one bucket: 100.9, 100.3, 100.6 seconds from now.
    for key, ttl in (("late", 100.9), ("first", 100.3), ("middle", 100.6)):
        completed(store, key, ttl)
    assert run(store.acquire("lease", FP, "t", 0.1)) is None  # a lease expiring before them all
    for gone in ("first", "middle", "late"):
        assert run(store.acquire("new-" + gone, FP, "t", 30.0)) is None
        assert run(store.get(gone)) is None
    assert run(store.get("lease")) is not None
    with pytest.raises(StoreUnavailable):
        run(store.acquire("one-too-many", FP, "t", 30.0))
    clock.now += 0.1  # the short lease expires: room again
    assert run(store.acquire("one-too-many", FP, "t", 30.0)) is None


def test_a_completion_that_does_not_fit_among_leases_is_refused_and_can_be_retried(
    clock: Clock,
) -> None:
    store = MemoryStore(max_bytes=400)
    assert run(store.acquire("a", FP, "t", 30.0)) is None
    room = store.max_bytes - store.bytes  # what a's answer may take when a is alone
    size = next(n for n in range(room, 0, -1) if len(encode_response(body(n))) <= room)
    big = body(size)
    assert run(store.acquire("other", FP, "t", 30.0)) is None  # a lease beside it: no room
    with pytest.raises(StoreUnavailable):
        run(store.complete("a", "t", big, 60.0))
    assert run(store.complete("a", "t", None, 60.0))  # unreplayable: no response bytes
    assert run(store.complete("a", "t", None, 60.0))  # retried: still true
    assert run(store.complete("a", "t", RESPONSE, 60.0)) is False  # another outcome: false
    record = run(store.get("a"))
    assert record is not None
    assert record.state == UNREPLAYABLE


def test_an_answer_that_could_never_fit_is_kept_unreplayable_and_evicts_nothing(
    clock: Clock,
) -> None:
    """Found by hand: it evicted every completed record, then was refused, so the lease stayed
    until it expired and a retry ran the request again (with memory_store_max_bytes 1MiB and
    an answer of max_stored_response's default 1MiB)."""
    store = MemoryStore(max_bytes=400)
    completed(store, "kept", 60.0)
    assert run(store.acquire("a", FP, "t", 30.0)) is None
    assert run(store.complete("a", "t", body(500), 60.0))
    record = run(store.get("a"))
    assert record is not None
    assert record.state == UNREPLAYABLE
    assert run(store.get("kept")) is not None
    assert run(store.complete("a", "t", body(500), 60.0))  # retried: still true
    assert store.bytes <= store.max_bytes


def test_eviction_at_the_bound_keeps_up(clock: Clock) -> None:
    """Evicting from the head of a bucket does not rescan what it evicted before."""
    store = MemoryStore(max_keys=2000)
    for i in range(2000):
        completed(store, f"old-{i}", 60.0, holder=f"t{i}")
    for i in range(4000):
        completed(store, f"new-{i}", 120.0, holder=f"t{i}")
    assert len(store) == 2000
    assert run(store.get("new-3999")) is not None
    assert run(store.get("new-1999")) is None
    assert sum(len(log) for log in store._done.logs.values()) < 2000 * 40


# --- a reference model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    state: str
    fingerprint: str
    token: str
    created_at: float
    deadline: float
    response: StoredResponse | None = None


def packed_size(key: str, entry: Model) -> int:
    fp = entry.fingerprint
    is_hex = len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)
    size = len(key) + memory._ENTRY.size + len(entry.token.encode("utf-8", "surrogatepass"))
    size += 32 if is_hex else len(fp.encode("utf-8", "surrogatepass"))
    return size + (len(encode_response(entry.response)) if entry.response else 0)


class Reference:
    def __init__(self, clock: Clock, max_keys: int, max_bytes: int) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.entries: dict[str, Model] = {}

    @property
    def bytes(self) -> int:
        return sum(packed_size(key, entry) for key, entry in self.entries.items())

    def expire(self) -> None:
        now = self.clock.now
        for key in [k for k, e in self.entries.items() if e.deadline <= now]:
            del self.entries[key]

    def make_room(self, keys: int, size: int) -> None:
        while self.entries and (
            len(self.entries) + keys > self.max_keys or self.bytes + size > self.max_bytes
        ):
            done = [(e.deadline, k) for k, e in self.entries.items() if e.state != IN_FLIGHT]
            if not done:
                raise StoreUnavailable("full of leases")
            del self.entries[min(done)[1]]

    def acquire(self, key: str, fp: str, token: str, lock_ttl: float) -> Record | None:
        self.expire()
        entry = self.entries.get(key)
        if entry is None:
            entry = Model(IN_FLIGHT, fp, token, self.clock.time(), self.clock.now + lock_ttl)
            self.make_room(1, packed_size(key, entry))
            self.entries[key] = entry
            return None
        if entry.state == IN_FLIGHT and entry.token == token:
            return None
        same = entry.state == COMPLETED and entry.fingerprint == fp
        response = entry.response if same else None
        return Record(entry.state, entry.fingerprint, entry.token, entry.created_at, response)

    def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        self.expire()
        entry = self.entries.get(key)
        if entry is None or entry.state != IN_FLIGHT or entry.token != token:
            return False
        self.entries[key] = replace(entry, deadline=self.clock.now + lock_ttl)
        return True

    def complete(self, key: str, token: str, response: StoredResponse | None, ttl: float) -> bool:
        self.expire()
        entry = self.entries.get(key)
        if entry is None or entry.token != token:
            return False
        state = COMPLETED if response is not None else UNREPLAYABLE
        if entry.state != IN_FLIGHT:
            return entry.state == state
        if response is not None:
            self.make_room(0, len(encode_response(response)))
        self.entries[key] = replace(
            entry, state=state, response=response, deadline=self.clock.now + ttl
        )
        return True

    def release(self, key: str, token: str) -> bool:
        self.expire()
        entry = self.entries.get(key)
        if entry is None or entry.state != IN_FLIGHT or entry.token != token:
            return False
        del self.entries[key]
        return True

    def get(self, key: str) -> Record | None:
        self.expire()
        entry = self.entries.get(key)
        if entry is None:
            return None
        expires_in = max(0.0, entry.deadline - self.clock.now)
        return Record(
            entry.state,
            entry.fingerprint,
            entry.token,
            entry.created_at,
            entry.response,
            expires_in,
        )

    def delete(self, key: str) -> bool:
        self.expire()
        return self.entries.pop(key, None) is not None


def both(
    method: Callable[..., Coroutine[Any, Any, Any]], reference: Callable[..., Any], *args: Any
) -> tuple[Any, Any]:
    """The store's and the model's answer to the same call ("unavailable" for a 503)."""
    got: Any = "unavailable"
    want: Any = "unavailable"
    with contextlib.suppress(StoreUnavailable):
        got = run(method(*args))
    with contextlib.suppress(StoreUnavailable):
        want = reference(*args)
    return got, want


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_agree_with_the_reference_model(clock: Clock, seed: int) -> None:
    rng = random.Random(seed)
    max_keys = rng.choice([3, 6, 50])
    max_bytes = rng.choice([400, 900, 1 << 20])
    store = MemoryStore(max_keys, max_bytes)
    model = Reference(clock, max_keys, max_bytes)
    keys = [f"k{i}" for i in range(8)]
    fps = [FP, OTHER_FP, "plain", "\udc80"]
    tokens = ["t1", "t2", "t3"]
    responses = [RESPONSE, None, StoredResponse(200, [], b"y" * 200)]
    for step in range(300):
        key, token = rng.choice(keys), rng.choice(tokens)
        ttl = rng.choice([0.05, 0.5, 1.0, 2.0]) + rng.random()  # no two deadlines tie
        op = rng.randrange(8)
        if op == 0:
            clock.now += rng.choice([0.0, 0.05, 0.3, 0.999, 1.0, 2.5])
            continue
        if op == 1:
            got, want = both(store.acquire, model.acquire, key, rng.choice(fps), token, ttl)
        elif op == 2:
            got, want = both(store.renew, model.renew, key, token, ttl)
        elif op == 3:
            response = rng.choice(responses)
            got, want = both(store.complete, model.complete, key, token, response, ttl * 3)
        elif op == 4:
            got, want = both(store.release, model.release, key, token)
        elif op == 5:
            got, want = both(store.get, model.get, key)
        elif op == 6:
            got, want = both(store.delete, model.delete, key)
        else:
            model.expire()
            got, want = len(store), len(model.entries)
        assert got == want, f"seed {seed}, step {step}, op {op}, key {key}"
        model.expire()
        assert store.bytes == model.bytes, f"seed {seed}, step {step}"
    run(store.close())
    assert len(store) == 0
