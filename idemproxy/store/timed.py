"""A store wrapper that times every call into the ``idemproxy_store_duration_seconds`` histogram."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from idemproxy.observability import LocalHistogram
from idemproxy.records import Record, StoredResponse
from idemproxy.store.base import Store

T = TypeVar("T")

_OPERATIONS = ("acquire", "renew", "complete", "release", "get", "delete", "ping")


class TimedStore:
    """Each method hands back ``_timed``'s coroutine itself: no coroutine of its own to create
    and resume on every store call."""

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

    def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Coroutine[Any, Any, Record | None]:
        return self._timed("acquire", self.inner.acquire(key, fingerprint, token, lock_ttl))

    def renew(self, key: str, token: str, lock_ttl: float) -> Coroutine[Any, Any, bool]:
        return self._timed("renew", self.inner.renew(key, token, lock_ttl))

    def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> Coroutine[Any, Any, bool]:
        return self._timed("complete", self.inner.complete(key, token, response, ttl))

    def release(self, key: str, token: str) -> Coroutine[Any, Any, bool]:
        return self._timed("release", self.inner.release(key, token))

    def get(self, key: str) -> Coroutine[Any, Any, Record | None]:
        return self._timed("get", self.inner.get(key))

    def delete(self, key: str) -> Coroutine[Any, Any, bool]:
        return self._timed("delete", self.inner.delete(key))

    def ping(self) -> Coroutine[Any, Any, None]:
        return self._timed("ping", self.inner.ping())

    def ready(self) -> Coroutine[Any, Any, None]:
        return self._timed("ping", self.inner.ready())

    async def close(self) -> None:
        await self.inner.close()
