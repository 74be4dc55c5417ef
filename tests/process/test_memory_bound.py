"""``limits.memory_store_max_bytes``: the memory store is bounded by the bytes it keeps.

SPEC section 7: one client sending large keyed answers must not grow the process without bound.
The last test measures that on a real ``idemproxy run`` process (its RSS from /proc).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from idemproxy.config import ConfigError, load_text
from idemproxy.errors import StoreUnavailable
from idemproxy.records import StoredResponse, encode_response
from idemproxy.store.memory import MemoryStore
from tests.conftest import HOST, ProxyFactory, Upstream, free_port, idemproxy_argv

MiB = 1024 * 1024


def response(size: int) -> StoredResponse:
    return StoredResponse(201, [("Content-Type", "application/octet-stream")], b"x" * size)


async def test_at_the_byte_bound_the_completed_record_expiring_first_is_evicted() -> None:
    store = MemoryStore(max_bytes=MiB)
    for key, ttl in (("a", 60.0), ("b", 30.0), ("c", 90.0)):
        assert await store.acquire(key, "fp", "t", 5.0) is None
        assert await store.complete(key, "t", response(300 * 1024), ttl)
    assert store.bytes <= MiB
    assert await store.acquire("d", "fp", "t", 5.0) is None
    assert await store.complete("d", "t", response(300 * 1024), 60.0)
    assert store.bytes <= MiB
    assert await store.get("b") is None  # the one closest to expiry went
    for kept in ("a", "c", "d"):
        assert await store.get(kept) is not None


async def test_the_byte_count_follows_every_way_an_entry_goes() -> None:
    store = MemoryStore(max_bytes=4 * MiB)
    assert await store.acquire("released", "fp", "t", 5.0) is None
    assert await store.release("released", "t")
    assert await store.acquire("deleted", "fp", "t", 5.0) is None
    assert await store.complete("deleted", "t", response(1000), 60.0)
    assert await store.delete("deleted")
    assert await store.acquire("expired", "fp", "t", 0.01) is None
    await asyncio.sleep(0.05)
    assert len(store) == 0
    assert store.bytes == 0


async def test_leases_are_never_evicted_for_bytes() -> None:
    store = MemoryStore(max_bytes=MiB)
    assert await store.acquire("big", "fp", "t", 60.0) is None
    room = store.max_bytes - store.bytes  # what big's answer may take when big is alone
    size = next(n for n in range(room, 0, -1) if len(encode_response(response(n))) <= room)
    assert await store.acquire("lease", "fp", "t", 60.0) is None
    with pytest.raises(StoreUnavailable):  # nothing completed to evict: retried like an outage
        await store.complete("big", "t", response(size), 60.0)
    assert (await store.get("lease")) is not None
    assert store.bytes < MiB


async def test_an_answer_larger_than_the_bound_runs_once_and_evicts_nothing(
    make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """An answer within max_stored_response (1MiB by default) that the memory store could never
    hold is kept like one over max_stored_response. Found by hand with ``idemproxy run``: it
    evicted every completed record, the completion failed, and once lock_ttl had passed a retry
    ran the request again."""
    proxy = await make_proxy("limits: {memory_store_max_bytes: 1MiB}\n")

    async def post(key: str, size: int) -> tuple[int, bytes, str | None]:
        headers = {"Idempotency-Key": key, "X-Test-Size": str(size)}
        async with http.post(proxy.url + "/orders", data=b"x", headers=headers) as answer:
            return answer.status, await answer.read(), answer.headers.get("Idempotent-Replayed")

    assert (await post("small", 100))[0] == 201
    status, body, _ = await post("big", MiB)
    assert (status, len(body)) == (201, MiB)
    status, body, _ = await post("big", MiB)
    assert status == 409
    assert json.loads(body)["code"] == "response_not_replayable"
    assert upstream.count("/orders") == 2
    assert (await post("small", 100))[2] == "true"  # nothing was evicted for it


def test_memory_store_max_bytes_is_read_and_checked() -> None:
    assert load_text("").limits.memory_store_max_bytes == 256 * MiB
    assert load_text("limits: {memory_store_max_bytes: 8MiB}\n").limits.memory_store_max_bytes == (
        8 * MiB
    )
    with pytest.raises(ConfigError) as caught:
        load_text("limits:\n  memory_store_max_bytes: 1KiB\n")
    assert [(p.path, p.line) for p in caught.value.problems] == [
        ("limits.memory_store_max_bytes", 2)
    ]


# --- a real process ---------------------------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def bounded_proxy(
    tmp_path: Path, upstream: Upstream
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text("limits:\n  memory_store_max_bytes: 16MiB\n")
    port = free_port()
    process = subprocess.Popen(
        idemproxy_argv(
            "run",
            "-c",
            str(policy),
            "--upstream",
            upstream.url,
            "--listen",
            f"{HOST}:{port}",
            "--admin",
            f"{HOST}:{free_port()}",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process, f"http://{HOST}:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.timeout(120)
async def test_large_keyed_answers_do_not_grow_the_process_past_the_bound(
    bounded_proxy: tuple[subprocess.Popen[bytes], str],
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    process, url = bounded_proxy
    size = 512 * 1024  # under max_stored_response (1MiB): every answer is kept for replay

    async def send(i: int) -> None:
        headers = {"Idempotency-Key": f"big-{i}", "X-Test-Size": str(size)}
        async with http.post(url + "/orders", data=b"x", headers=headers) as answer:
            assert answer.status == 201
            assert len(await answer.read()) == size

    for _ in range(150):
        try:
            async with http.get(url + "/__probe") as probe:
                if probe.status < 500:
                    break
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    for i in range(64):  # warm up: the store full, pools and buffers at their working size
        await send(i)
    before = rss(process.pid)
    sent = 64
    for start in range(sent, sent + 320, 8):  # 160 MiB more of answers, ten times the bound
        await asyncio.gather(*(send(i) for i in range(start, start + 8)))
    after = rss(process.pid)
    grown = (after - before) / MiB
    print(f"\n[memory-bound] stored={320 * size // MiB}MiB bound=16MiB rss_growth={grown:.1f}MiB")
    assert grown < 48, f"RSS grew by {grown:.1f} MiB for a 16 MiB bound"
    async with http.post(
        url + "/orders", data=b"x", headers={"Idempotency-Key": f"big-{sent + 319}"}
    ) as replay:  # the newest record is still there
        assert replay.headers.get("Idempotent-Replayed") == "true"
