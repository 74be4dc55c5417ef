"""The hot path's metrics are counted in-process and handed to prometheus-client by
``Metrics.publish``: the exposition must be exactly what prometheus-client's own calls make.

``LocalHistogram`` reaches into a prometheus-client histogram child (``_upper_bounds``,
``_buckets``, ``_sum``); this is the canary for those, on the installed version.
"""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from idemproxy.observability import (
    UPSTREAM_BUCKETS,
    LocalCounter,
    LocalGauge,
    LocalHistogram,
    Metrics,
)
from idemproxy.problems import Outcome


def _pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


def _exposed(registry: CollectorRegistry) -> list[str]:
    """The exposition without ``*_created`` (a timestamp of when each was made)."""
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def test_a_local_histogram_publishes_what_observe_would_have() -> None:
    direct_registry, local_registry = _pair()
    direct = Histogram("t", "t", ["route"], buckets=UPSTREAM_BUCKETS, registry=direct_registry)
    local = LocalHistogram(
        Histogram("t", "t", ["route"], buckets=UPSTREAM_BUCKETS, registry=local_registry).labels(
            "r"
        )
    )
    rng = random.Random(17)
    # every bound exactly (le is inclusive), between them, past the last, and zero
    amounts = [*UPSTREAM_BUCKETS, 0.0, 1000.0] + [rng.uniform(0, 400) for _ in range(500)]
    for round_ in range(3):  # publish more than once: nothing counted twice or lost
        for amount in amounts[round_::3]:
            direct.labels("r").observe(amount)
            local.observe(amount)
        local.publish()
    local.publish()  # nothing new: a no-op
    assert _exposed(local_registry) == _exposed(direct_registry)


def test_a_local_counter_and_gauge_publish_what_inc_and_set_would_have() -> None:
    direct_registry, local_registry = _pair()
    direct_counter = Counter("c", "c", ["route"], registry=direct_registry).labels("r")
    direct_gauge = Gauge("g", "g", registry=direct_registry)
    counter = LocalCounter(Counter("c", "c", ["route"], registry=local_registry).labels("r"))
    gauge = LocalGauge(Gauge("g", "g", registry=local_registry))
    for _ in range(7):
        direct_counter.inc()
        counter.count += 1
    for step in (1, 1, -1, 1, -1, -1, 1):
        (direct_gauge.inc if step > 0 else direct_gauge.dec)()
        (gauge.inc if step > 0 else gauge.dec)()
        if step < 0:
            counter.publish()
            gauge.publish()
    counter.publish()
    gauge.publish()
    assert _exposed(local_registry) == _exposed(direct_registry)


def test_metrics_exposition_includes_what_was_counted_since_the_last_publish() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.count("orders", Outcome.NEW)
    metrics.upstream_timer("orders").observe(0.02)
    metrics.store_timer("acquire").observe(0.0007)
    metrics.locks_in_flight.inc()
    text = metrics.exposition().decode()
    assert 'idemproxy_requests_total{outcome="new",route="orders"} 3.0' in text
    assert 'idemproxy_upstream_duration_seconds_bucket{le="0.025",route="orders"} 1.0' in text
    assert 'idemproxy_store_duration_seconds_count{operation="acquire"} 1.0' in text
    assert "idemproxy_locks_in_flight 1.0" in text
