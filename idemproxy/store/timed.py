"""A store wrapper that times every call into the ``idemproxy_store_duration_seconds`` histogram."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from idemproxy.observability import LocalHistogram
from idemproxy.records import Record, StoredResponse
from idemproxy.store.base import Store

T = TypeVar("T")

_OPERATIONS = ("acquire", "renew", "complete", "release", "get", "delete", "ping")


class TimedStore:
    def __init__(self, inner: Store, timer: Callable[[str], LocalHistogram]) -> None:
        """``timer(operation)``: the histogram of one operation, asked for once each."""
        self.inner = inner
        self._timers = {operation: timer(operation) for operation in _OPERATIONS}

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await call
        finally:
            self._timers[operation].observe(time.monotonic() - started)

    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        return await self._timed("acquire", self.inner.acquire(key, fingerprint, token, lock_ttl))

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        return await self._timed("renew", self.inner.renew(key, token, lock_ttl))

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        return await self._timed("complete", self.inner.complete(key, token, response, ttl))

    async def release(self, key: str, token: str) -> bool:
        return await self._timed("release", self.inner.release(key, token))

    async def get(self, key: str) -> Record | None:
        return await self._timed("get", self.inner.get(key))

    async def delete(self, key: str) -> bool:
        return await self._timed("delete", self.inner.delete(key))

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def ready(self) -> None:
        await self._timed("ping", self.inner.ready())

    async def close(self) -> None:
        await self.inner.close()
