"""Stores keep one record per scoped key. ``open_store`` picks the implementation by URL."""

from __future__ import annotations

from idemproxy.settings import StoreConfig
from idemproxy.store.base import NotReplicated, Store


def open_store(
    config: StoreConfig,
    memory_max_keys: int = 1_000_000,
    memory_max_bytes: int = 256 * 1024 * 1024,
) -> Store:
    if config.url == "memory://":
        from idemproxy.store.memory import MemoryStore

        return MemoryStore(memory_max_keys, memory_max_bytes)
    from idemproxy.store.redis import RedisStore

    return RedisStore(config)


__all__ = ["NotReplicated", "Store", "open_store"]
