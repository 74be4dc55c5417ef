"""idemproxy: an idempotency-key reverse proxy.

The pipeline, one request at a time::

    client -> proxy.handle -> policy.match(method, path) -> unmatched: upstream.stream, relay
                                   | keyed route
                                   v
            engine.admit / engine.preconditions / keys.extract -> engine.on_key  (pure)
                                   v
                      keys.fingerprint, keys.store_key          (pure)
                                   v
                      store.acquire(key, fingerprint, token)   (one atomic step: lock or read)
                                   v
                      engine.on_existing(record, ...)           (pure: replay, wait or refuse)
          +-------------+--------------+----------------+
        forward       replay         wait           Refuse(code) -> answers.problem_answer
          |
    upstream.exchange (lease renewed) -> engine.after_response | after_failure -> store.complete
                                                                                 | store.release
                                      -> answers.buffered | relay_exchange

Rooms, one reason to change each:

- ``engine``: the whole decision table of SPEC section 4 as pure functions; each decision names
  a problem of the one catalogue in ``problems`` (status, title, outcome per code) or what to do
  next. ``engine``, ``policy``, ``keys`` and ``problems`` import nothing that does I/O.
- ``proxy``: the async shell around ``engine``; it awaits the client, the store, the upstream.
- ``upstream``: talks to the upstream only; returns an ``Exchange`` or raises
  ``UpstreamFailure``. ``http1`` is its lean HTTP/1.1 client (sockets, pool, request
  serialisation); ``response_parser`` parses answers without I/O (bytes in, events out).
- ``answers``: talks to the client only; relays, buffered answers, replays, problem answers,
  WebSockets.
- ``store/``: the only room that knows Redis. ``settings``: the frozen settings the request
  path reads; ``config/`` builds them from the policy file (``reader`` YAML with lines,
  ``build`` the file model of ``model`` checked field by field, ``resolve`` defaults merged;
  every default is in ``config.model``), with errors that carry field path and line.
- ``aiohttp_internals``: the only room that touches aiohttp's private attributes (a canary
  test guards them). ``admin``, ``observability`` (with ``tracing`` / ``otel``), ``app``,
  ``server``, ``cli``, ``admin_cli`` (``idemproxy keys``) and ``supervisor`` run and watch it;
  ``policy_values`` parses the policy's small value languages, ``redact`` keeps passwords out
  of logs.
"""

__version__ = "0.1.0"
