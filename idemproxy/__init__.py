"""idemproxy: an idempotency-key reverse proxy.

The pipeline, one request at a time::

    client -> proxy.handle -> policy.match(method, path) -> unmatched: upstream.stream
                                   | keyed route
                                   v
                      keys.extract / keys.fingerprint          (pure)
                                   v
                      store.acquire(key, fingerprint, token)   (one atomic step: lock or read)
                                   v
                      engine.classify(existing, fingerprint)   (pure decision table, SPEC section 4)
          +-------------+--------------+--------------+-----------------+
        Forward       Replay        InProgress      Mismatch      NotReplayable
          |
    upstream.exchange (lease renewed) -> engine.after_response -> store.complete | release

``engine``, ``policy`` and ``keys`` do no I/O; ``proxy`` is the async shell that awaits the store,
the upstream and the client. Only ``store/`` knows Redis; only ``upstream`` knows aiohttp's client;
only ``aiohttp_internals`` touches aiohttp's private attributes (a canary test guards them).
"""

__version__ = "0.1.0"
