"""The store protocol. Every state change is one atomic step on one key.

Locks are leases with a token: ``renew``, ``complete`` and ``release`` succeed only for the
holder of the current token, so a holder whose lease expired can never overwrite the record of a
newer holder (fencing). Every method raises ``StoreUnavailable`` when the store cannot answer.
"""

from __future__ import annotations

from typing import Protocol

from idemproxy.errors import StoreUnavailable
from idemproxy.records import Record, StoredResponse


class NotReplicated(StoreUnavailable):
    """``store.wait_replicas`` replicas did not acknowledge a write within ``wait_timeout``.

    From ``acquire``: the lease was released again (``maybe_applied`` False) or could not be
    (True). From ``complete``: the record is on the master; only its replication is in doubt.
    """


class Store(Protocol):
    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        """Take the lease on ``key`` if nobody holds or completed it: return None.

        Otherwise return the existing record, with its response only when it is completed and
        its fingerprint equals ``fingerprint``. Acquiring again with the current token (a retried
        call) counts as acquired.
        """

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        """Extend the lease; False when ``token`` no longer holds it."""

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        """Store the response (None: completed but not replayable) and keep it for ``ttl``."""

    async def release(self, key: str, token: str) -> bool:
        """Drop the lease so that a retry runs again; False when ``token`` no longer holds it."""

    async def get(self, key: str) -> Record | None: ...

    async def delete(self, key: str) -> bool: ...

    async def ping(self) -> None: ...

    async def ready(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers and, with ``wait_replicas``,
        has that many replicas connected."""

    async def close(self) -> None: ...
