"""Metrics (Prometheus, via prometheus-client) and logs (one JSON line per request and event).

Labels are bounded: ``route`` is a route's name or pattern, never a raw path; ``outcome`` is one
of ``problems.Outcome``; ``operation`` one of the store's methods; ``process`` (``--workers``
only) ``supervisor`` or ``worker-N``.

One process and ``--workers`` expose the same series: the workers' metrics are summed through
prometheus-client's multiprocess mode, which has no ``*_created`` series, so neither mode has
them; ``process_*`` series are the process's own, and with ``--workers`` one set per process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import select
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

from idemproxy.problems import Outcome

UNMATCHED = "unmatched"
LogFormat = Literal["json", "text"]

access_log = logging.getLogger("idemproxy.access")
event_log = logging.getLogger("idemproxy")


# Up to and past upstream.timeout's default of 60s, so slow exchanges are not all in +Inf.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UPSTREAM_HELP = (
    "Upstream time: keyed requests until the answer was read (one too large to store: until its "
    "head), pass-through until it was relayed."
)


class Metrics:
    """The proxy's metrics, in a registry of its own (one per ProxyServer)."""

    def __init__(self) -> None:
        # Multiprocess mode (--workers) cannot make *_created series; one process must show the
        # same series. A process-wide switch of prometheus-client: idemproxy owns its process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, ..._memory_bytes
        self.requests = Counter(
            "idemproxy_requests",
            "Requests by route and outcome.",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "idemproxy_upstream_duration_seconds",
            UPSTREAM_HELP,
            ["route"],
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.store_duration = Histogram(
            "idemproxy_store_duration_seconds",
            "Duration of store calls.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.store_unreplicated = Counter(
            "idemproxy_store_unreplicated",
            "Completions answered before store.wait_replicas replicas acknowledged them.",
            registry=self.registry,
        )
        self.leases_lost = Counter(
            "idemproxy_leases_lost",
            "Leases found gone when their request settled (expired or taken while it ran).",
            registry=self.registry,
        )
        self.fail_open = Counter(
            "idemproxy_fail_open",
            "Keyed requests forwarded unprotected because the store was unavailable "
            "(store.on_error: fail_open).",
            registry=self.registry,
        )
        self.locks_in_flight = LocalGauge(
            Gauge(
                "idemproxy_locks_in_flight",
                "Leases held while their upstream call runs.",
                registry=self.registry,
                multiprocess_mode="livesum",  # with --workers: summed over the live workers
            )
        )
        self._request_counters: dict[tuple[str, Outcome], LocalCounter] = {}
        self._upstream_timers: dict[str, LocalHistogram] = {}
        self._local: list[LocalCounter | LocalHistogram | LocalGauge] = [self.locks_in_flight]

    def upstream_timer(self, route: str) -> LocalHistogram:
        """The upstream histogram of ``route``."""
        timer = self._upstream_timers.get(route)
        if timer is None:
            timer = LocalHistogram(self.upstream_duration.labels(route))
            self._upstream_timers[route] = timer
            self._local.append(timer)
        return timer

    def store_timer(self, operation: str) -> LocalHistogram:
        """The store histogram of ``operation`` (one per operation: ``TimedStore`` keeps it)."""
        timer = LocalHistogram(self.store_duration.labels(operation))
        self._local.append(timer)
        return timer

    def count(self, route: str, outcome: Outcome) -> None:
        """Count one request."""
        counter = self._request_counters.get((route, outcome))
        if counter is None:
            counter = LocalCounter(self.requests.labels(route, outcome.value))
            self._request_counters[(route, outcome)] = counter
            self._local.append(counter)
        counter.count += 1

    def publish(self) -> None:
        """Hand what was counted since the last call to prometheus-client (see ``LocalCounter``).
        Called before every scrape of this process and, in a worker, every
        ``WORKER_PUBLISH_INTERVAL`` and once more as it stops."""
        for metric in self._local:
            metric.publish()

    def exposition(self) -> bytes:
        self.publish()
        return generate_latest(self.registry)


# How often a worker (--workers) hands its counts to the supervisor's /metrics.
WORKER_PUBLISH_INTERVAL = 0.5  # seconds


class LocalCounter:
    """Requests counted in this process, added to a prometheus-client counter by ``publish``.

    The hot path's metrics are plain numbers here: with ``--workers``, prometheus-client writes
    every increment through a lock into a memory-mapped file the supervisor reads, about 3 µs
    an increment and 6 µs an observation (some 25 µs a keyed request); a ``publish`` writes once
    per series that changed.
    """

    __slots__ = ("_child", "count")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.count = 0

    def publish(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self._child.inc(count)


class LocalGauge:
    """A gauge kept in this process; ``publish`` sets prometheus-client's to its value."""

    __slots__ = ("_child", "_published", "value")

    def __init__(self, child: Gauge) -> None:
        self._child = child
        self.value = 0
        self._published = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1

    def publish(self) -> None:
        if self.value != self._published:
            self._published = self.value
            self._child.set(self.value)


class LocalHistogram:
    """Observations kept in this process (a bucket count and a sum), added to a
    prometheus-client histogram child by ``publish``.

    prometheus-client has no public call that adds a count to a bucket, so ``publish`` uses the
    child's ``_upper_bounds``, ``_buckets`` and ``_sum``, which ``Histogram.observe`` itself
    uses; tests/unit/test_observability.py checks the exposition is the same as observe()'s.
    """

    __slots__ = ("_bounds", "_buckets", "_counts", "_sum", "_total", "_touched")

    def __init__(self, child: Histogram) -> None:
        self._bounds: list[float] = list(child._upper_bounds)
        self._buckets = child._buckets
        self._sum = child._sum
        self._counts = [0] * len(self._bounds)
        self._total = 0.0
        self._touched = False

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1  # the first bound >= amount
        self._total += amount
        self._touched = True

    def publish(self) -> None:
        if not self._touched:
            return
        self._touched = False
        self._sum.inc(self._total)
        self._total = 0.0
        counts = self._counts
        for index, count in enumerate(counts):
            if count:
                self._buckets[index].inc(count)
                counts[index] = 0


class ProcessesCollector(Collector):
    """``process_*`` series of several processes (``--workers``), one ``process`` label each.

    ``processes`` names the live ones: ``("supervisor", pid)``, ``("worker-0", pid)``, ... A
    worker restarted under the same name starts its counters again, as a restarted process does.
    """

    def __init__(self, processes: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._processes = processes

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name, pid in self._processes():
            # prometheus-client's reader of /proc/<pid> (it takes a callable that returns the pid);
            # a process gone meanwhile yields nothing.
            reader = ProcessCollector(pid=functools.partial(int, pid), registry=None)
            for family in reader.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "process": name}, sample.value)
        return families.values()


def workers_exposition(processes: Callable[[], Iterable[tuple[str, int]]]) -> Callable[[], bytes]:
    """The supervisor's ``/metrics``: the workers' metrics summed (prometheus-client's
    multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``) and the ``process_*`` series of each
    process in ``processes``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(ProcessesCollector(processes))
    return lambda: generate_latest(registry)


@dataclass(slots=True)
class Trace:
    """What one request turned out to be, filled in as it goes; logged and counted at the end."""

    method: str
    path: str
    started: float
    route: str = UNMATCHED
    outcome: Outcome = Outcome.PASSTHROUGH
    key_hash: str | None = None
    route_path: str | None = None  # the matched route's pattern (tracing's http.route)
    trace_id: str | None = None  # with tracing on: the request's trace, in the access line

    def finish(self, metrics: Metrics, status: int) -> None:
        duration = time.monotonic() - self.started
        metrics.count(self.route, self.outcome)
        if not access_log.isEnabledFor(logging.INFO):  # the logger's level rules both paths
            return
        if _direct_access_log is not None:
            _direct_access_log.write(self, status, duration)
        else:
            access_log.info("request", extra={"fields": self.fields(status, duration)})

    def fields(self, status: int, duration: float) -> dict[str, Any]:
        fields = {
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "outcome": self.outcome.value,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "key_hash": self.key_hash,
        }
        if self.trace_id is not None:
            fields["trace_id"] = self.trace_id
        return fields


_json_line = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return _json_line.encode(line).decode()


class TextFormatter(logging.Formatter):
    """For humans at a terminal: the message, then the fields as key=value, then the traceback
    of an error on the lines below (as ``logging``'s own formatter writes it)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        base = f"{self.formatTime(record)} {record.levelname} {record.getMessage()}"
        line = f"{base} {extra}" if extra else base
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class DirectAccessLog:
    """The access line of a running proxy, written without the ``logging`` module.

    The same JSON object ``JsonFormatter`` makes, encoded once; lines are written to stderr
    together (under ``--workers``, whose processes share stderr: in whole-line writes of at
    most PIPE_BUF bytes, see ``_whole_lines``), at most
    ``_FLUSH_INTERVAL`` after the first of them or once ``_FLUSH_LINES`` are waiting, and at
    shutdown. A record, a handler lock, a formatter and a flush per line cost
    ~50 µs a request (bench/profile-new-keys.txt of 2026-11-29 05:35). Without
    ``setup_logging`` (tests, embedding), access lines stay records on ``idemproxy.access``.
    """

    def __init__(self, stream: BinaryIO, piece_limit: int | None = None) -> None:
        self._stream = stream
        self._piece_limit = piece_limit  # None: one write for all waiting lines
        self._lines: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""

    def write(self, trace: Trace, status: int, duration: float) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = {
            "time": f"{self._second_text}.{int((now - second) * 1000):03d}Z",
            "level": "info",
            "logger": access_log.name,
            "message": "request",
            **trace.fields(status, duration),
        }
        self._lines.append(_json_line.encode(line))
        if len(self._lines) >= _FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(_FLUSH_INTERVAL, self.flush)
            except RuntimeError:  # no loop to flush later: write at once
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            if self._piece_limit is None:
                self._lines.append(b"")
                self._stream.write(b"\n".join(self._lines))
                self._stream.flush()
            else:
                for piece in _whole_lines(self._lines, self._piece_limit):
                    self._stream.write(piece)
                    self._stream.flush()
            self._lines.clear()


def _whole_lines(lines: list[bytes], limit: int) -> Iterator[bytes]:
    """``lines`` joined into pieces of at most ``limit`` bytes, each ending at a line's end (a
    longer line is a piece of its own).

    With ``--workers`` every process writes to the same stderr, often a pipe. A write of up to
    PIPE_BUF bytes to a pipe is atomic; a longer one is not, and the lines of two workers
    interleaved mid-line once the reader fell behind (found by hand: 194 broken lines of 6000).
    """
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) + 1 > limit:
            yield b"\n".join(piece) + b"\n"
            piece, size = [], 0
        piece.append(line)
        size += len(line) + 1
    if piece:
        yield b"\n".join(piece) + b"\n"


_FLUSH_INTERVAL = 0.05  # seconds
_FLUSH_LINES = 256
_direct_access_log: DirectAccessLog | None = None


def setup_logging(log_format: LogFormat, shared_stderr: bool = False) -> None:
    """Log to stderr in ``log_format``; JSON access lines take the direct path.
    ``shared_stderr``: other processes write there too (``--workers``)."""
    global _direct_access_log
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # aiohttp logs a malformed request with its raw header line, which may hold a credential;
    # the proxy logs its own errors (without request data) instead.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    _direct_access_log = (
        DirectAccessLog(sys.stderr.buffer, select.PIPE_BUF if shared_stderr else None)
        if log_format == "json"
        else None
    )


def flush_access_log() -> None:
    """Write out the access lines of the current loop iteration (on shutdown)."""
    if _direct_access_log is not None:
        _direct_access_log.flush()


# With tracing on (idemproxy.otel): the id of the trace of the request being handled, if any.
_current_trace_id: Callable[[], str | None] | None = None


def set_trace_id_source(source: Callable[[], str | None] | None) -> None:
    """Event lines logged while a request is traced carry its ``trace_id`` from ``source``."""
    global _current_trace_id
    _current_trace_id = source


def event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """A startup / shutdown / reload / store-error event as one log line."""
    if _current_trace_id is not None and "trace_id" not in fields:
        trace_id = _current_trace_id()
        if trace_id is not None:
            fields["trace_id"] = trace_id
    event_log.log(level, message, extra={"fields": fields})
