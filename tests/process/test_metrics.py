"""/metrics of a real running proxy, in one process and with ``--workers`` (SPEC section 6).

Both modes are started as ``python -m idemproxy run`` in front of the demo upstream and a real
Redis, given the same requests, and scraped: they must expose the same metric families and
series (HELP and TYPE included), ``process_*`` series in both, no ``*_created`` series, and an
exposition that prometheus-client's parser and, where installed, ``promtool`` accept.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from idemproxy.observability import UPSTREAM_HELP
from tests.conftest import HOST, RedisProcess, free_port, idemproxy_argv

ROOT = Path(__file__).resolve().parents[2]
POLICY = """
routes:
  - name: create-order
    match: {methods: [POST], path: /orders}
    key: {required: true}
"""
MODES = {"single": 1, "workers": 2}
UPSTREAM_HISTOGRAM = "idemproxy_upstream_duration_seconds"


def wait_until_answering(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until ``port`` answers an HTTP request (bounded; fails if the process exits)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "the process exited while starting"
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/__probe")
            connection.getresponse().read()
            connection.close()
            return
        except OSError:
            time.sleep(0.05)  # not yet listening
    raise AssertionError(f"nothing answered on port {port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def send_traffic(port: int, key: str) -> None:
    """A pass-through, then new, replayed, mismatch and missing-key requests, on one connection.

    A request is counted before its buffered answer is sent, and a keep-alive connection takes
    its next request only after the previous one was counted, so when the last answer is here,
    every count is in: no waiting for metrics to settle.
    """
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    requests = [
        ("GET", "/orders/999", b"", {}, 404),
        ("POST", "/orders", b'{"sku": "tea"}', {"Idempotency-Key": key}, 201),
        ("POST", "/orders", b'{"sku": "tea"}', {"Idempotency-Key": key}, 201),
        ("POST", "/orders", b'{"sku": "mate"}', {"Idempotency-Key": key}, 422),
        ("POST", "/orders", b'{"sku": "tea"}', {}, 400),
    ]
    for method, path, body, headers, status in requests:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == status, (method, path, headers)
    connection.close()


@pytest.fixture(scope="module")
def expositions(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The /metrics text of each mode after the same requests."""
    policy = tmp_path_factory.mktemp("metrics") / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "idemproxy.demo", "--host", HOST, "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = [upstream]
    texts = {}
    try:
        wait_until_answering(upstream_port, upstream)
        for mode, workers in MODES.items():
            port, admin_port = free_port(), free_port()
            proxy = subprocess.Popen(
                idemproxy_argv(
                    "run",
                    "-c",
                    str(policy),
                    "--upstream",
                    f"http://{HOST}:{upstream_port}",
                    "--store",
                    redis_server.url,
                    "--listen",
                    f"{HOST}:{port}",
                    "--admin",
                    f"{HOST}:{admin_port}",
                    "--workers",
                    str(workers),
                    "--log-format",
                    "text",
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started.append(proxy)
            wait_until_answering(port, proxy)
            send_traffic(port, f"metrics-{mode}-{time.time_ns()}")
            url = f"http://{HOST}:{admin_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                texts[mode] = response.read().decode()
        yield texts
    finally:
        for process in reversed(started):
            stop(process)


def families(text: str) -> dict[str, tuple[str, str]]:
    """Family name -> (type, HELP); the parser raises on an invalid exposition."""
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


def series(text: str) -> dict[str, set[frozenset[str]]]:
    """Sample name -> the label names it comes with (not ``process``: see below)."""
    found: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(sample.labels) - {"process"}
            found.setdefault(sample.name, set()).add(labels)
    return found


def test_both_modes_expose_the_same_families_and_series(expositions: dict[str, str]) -> None:
    single, workers = expositions["single"], expositions["workers"]
    assert families(single) == families(workers)
    assert series(single) == series(workers)
    requests = {
        sample.labels["outcome"]
        for family in text_string_to_metric_families(workers)
        for sample in family.samples
        if sample.name == "idemproxy_requests_total"
    }
    assert {"passthrough", "new", "replayed", "mismatch", "missing_key"} <= requests


@pytest.mark.parametrize("mode", MODES)
def test_no_created_series(expositions: dict[str, str], mode: str) -> None:
    created = [name for name in series(expositions[mode]) if name.endswith("_created")]
    assert created == []


@pytest.mark.parametrize("mode", MODES)
def test_process_metrics(expositions: dict[str, str], mode: str) -> None:
    found: dict[str, set[str | None]] = {}
    for family in text_string_to_metric_families(expositions[mode]):
        for sample in family.samples:
            if sample.name.startswith("process_"):
                found.setdefault(sample.name, set()).add(sample.labels.get("process"))
    names = {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    }
    assert set(found) == names
    # One process: its own series, unlabelled. --workers: one set per process.
    expected = {None} if mode == "single" else {"supervisor", "worker-0", "worker-1"}
    for name in names:
        assert found[name] == expected, name


@pytest.mark.parametrize("mode", MODES)
def test_upstream_histogram_reaches_past_the_default_upstream_timeout(
    expositions: dict[str, str], mode: str
) -> None:
    (family,) = [
        f for f in text_string_to_metric_families(expositions[mode]) if f.name == UPSTREAM_HISTOGRAM
    ]
    bounds = {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
    assert {10.0, 60.0, float("inf")} <= bounds
    assert max(bounds - {float("inf")}) > 60.0  # upstream.timeout defaults to 60s
    assert family.documentation == UPSTREAM_HELP


def test_readme_describes_the_upstream_histogram_as_its_help_does() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (row,) = [
        line for line in readme.splitlines() if line.startswith(f"  | `{UPSTREAM_HISTOGRAM}`")
    ]
    assert UPSTREAM_HELP in row


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian: apt-get install prometheus)",
)
@pytest.mark.parametrize("mode", MODES)
def test_promtool_accepts_the_exposition(expositions: dict[str, str], mode: str) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"],  # noqa: S607 - promtool from PATH, as installed
        input=expositions[mode],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
