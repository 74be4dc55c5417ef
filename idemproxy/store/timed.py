"""A store wrapper that times every call into the ``idemproxy_store_duration_seconds`` histogram."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Histogram

from idemproxy.records import Record, StoredResponse
from idemproxy.store.base import Store


class TimedStore:
    def __init__(self, inner: Store, histogram: Histogram) -> None:
        self.inner = inner
        self._histogram = histogram

    @contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self._histogram.labels(operation).observe(time.monotonic() - started)

    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        with self._timed("acquire"):
            return await self.inner.acquire(key, fingerprint, token, lock_ttl)

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        with self._timed("renew"):
            return await self.inner.renew(key, token, lock_ttl)

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        with self._timed("complete"):
            return await self.inner.complete(key, token, response, ttl)

    async def release(self, key: str, token: str) -> bool:
        with self._timed("release"):
            return await self.inner.release(key, token)

    async def get(self, key: str) -> Record | None:
        with self._timed("get"):
            return await self.inner.get(key)

    async def delete(self, key: str) -> bool:
        with self._timed("delete"):
            return await self.inner.delete(key)

    async def ping(self) -> None:
        with self._timed("ping"):
            await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
