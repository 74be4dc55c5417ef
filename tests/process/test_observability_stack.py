"""The Grafana dashboard and the Prometheus alerting rules of ``deploy/observability/``.

``promtool`` checks the rules and the Compose stack's Prometheus config and runs the rules' unit
tests. Then a real Prometheus (``prometheus`` from PATH, on a free loopback port, with a config
and a storage directory of its own) scrapes two real idemproxy processes, one on a real Redis
and one fail-open on a store that is down, plus a port where nothing listens, while the test
sends a little traffic of every kind the dashboard shows. Every expression of the dashboard and
of the rules is then asked through Prometheus' HTTP API: each must return data, except the ones
listed in ``EXPECTED_EMPTY`` (the condition is legitimately absent), and each expression that
uses a metric of ``NOT_YET_EXPORTED`` while this idemproxy does not export it. Without
``prometheus`` / ``promtool`` on PATH the tests that need them are skipped, saying so
(``apt-get install prometheus`` installs both; ``.ci/run`` does).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HOST, RedisProcess, Upstream, free_port

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
PROMETHEUS_DIR = OBSERVABILITY / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "idemproxy.json"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (apt-get install prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not on PATH (apt-get install prometheus)"
)

# Metrics the dashboard and the rules use that this idemproxy may not export yet, with the
# reason. While one is absent from /metrics, an expression on it must come back empty (and is
# reported); once idemproxy exports it, its expressions are held to the same rules as the rest.
NOT_YET_EXPORTED: dict[str, str] = {}

# Alert expressions whose condition the traffic below legitimately does not create: they must
# be a valid, empty vector. (Each of their metric selectors must still return data.)
EXPECTED_EMPTY = {
    "IdemproxyLocksPilingUp": "at most one lease is held at a time here, far below 256",
    "IdemproxyUnreplicatedCompletions": "no store.wait_replicas is configured: nothing to miss",
    "IdemproxyLeaseLost": "every lease here is held until its request settles",
}


# --- static checks -----------------------------------------------------------------------------


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document = json.loads(DASHBOARD.read_text())
    assert isinstance(document, dict)
    return document


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL) of every query of the dashboard."""
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


@needs_promtool
def test_promtool_checks_the_rules_and_the_compose_prometheus_config() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout, result.stdout
    result = run_promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_cover_every_alert() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a case that expects the alert to fire, not only silence
    }
    assert tested == {rule["alert"] for rule in rules()}


def test_every_rule_is_an_alert_with_a_severity_a_summary_and_a_description() -> None:
    names = [rule.get("alert") for rule in rules()]
    assert all(names), "recording rules? they would need their own checks"
    assert len(set(names)) == len(names), names
    for rule in rules():
        assert re.fullmatch(r"Idemproxy[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule
        assert {"summary", "description"} <= set(rule["annotations"]), rule


def test_dashboard_model_is_consistent() -> None:
    model = dashboard()
    assert model["uid"] == "idemproxy"
    assert isinstance(model["schemaVersion"], int)
    ids = [panel["id"] for panel in model["panels"]]
    assert len(set(ids)) == len(ids), ids
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # Panels ask the data source the viewer picked (or the provisioned one), never a fixed uid.
    cells: set[tuple[int, int]] = set()
    for panel in model["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]


def test_dashboard_queries_follow_the_grafana_dashboard_linter_conventions() -> None:
    """Those of grafana/dashboard-linter: job and instance variables (multi-select, all = .+)
    that every query filters on, rate windows of $__rate_interval, counters only under rate(),
    buckets only under histogram_quantile()."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["label"] == name.title(), name
        assert variable["datasource"]["uid"] == "${datasource}", name
        assert variable["multi"] is True, name
        assert variable["allValue"] == ".+", name
        assert variable["refresh"] == 2, name  # on time range change
    for title, expr in dashboard_targets():
        for selector in selectors(expr):
            assert 'job=~"$job"' in selector, (title, selector)
            assert 'instance=~"$instance"' in selector, (title, selector)
        windows = set(re.findall(r"\[([^\]]+)\]", expr))
        assert windows <= {"$__rate_interval"}, (title, windows)
        for counter in re.finditer(r"\w+_total\{", expr):
            assert expr[: counter.start()].endswith("rate("), (title, expr)
        for bucket in re.finditer(r"\w+_bucket\{", expr):
            assert "histogram_quantile(" in expr[: bucket.start()], (title, expr)


def test_dashboard_covers_what_operators_look_for() -> None:
    """Issue 16: requests by outcome and route, replay ratio, conflicts and mismatches, store
    and upstream latency quantiles, locks in flight, store errors, unreplicated completions,
    fail-open forwards."""
    queries = "\n".join(expr for _, expr in dashboard_targets())
    titles = {panel["title"] for panel in dashboard_panels()}
    assert {
        "Requests by outcome",
        "Requests by route",
        "Replay ratio",
        "Conflicts and mismatches",
        "Upstream latency by route",
        "Store latency by operation",
        "Locks in flight",
        "Store errors and fail-open forwards",
        "Unreplicated completions",
    } <= titles, titles
    assert "sum by (outcome)" in queries
    assert "sum by (route)" in queries
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, route)" in queries
        assert f"histogram_quantile({quantile}, sum by (le, operation)" in queries


# --- the real stack ----------------------------------------------------------------------------


_NO_PROXY_ENV = {
    k: v
    for k, v in os.environ.items()
    if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
}
_DEADLINE = 20.0  # seconds for each wait below; every loop is bounded by one


def substitute(expr: str) -> str:
    """The dashboard's variables as Grafana fills them in: one job, all instances, and a rate
    window that spans the whole test at a 1 s scrape interval."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$job", "idemproxy")
        .replace("$instance", ".+")
    )


_SELECTOR = re.compile(r"\b(idemproxy_[a-z_]+|up)\b(\{[^}]*\})?")


def selectors(expr: str) -> set[str]:
    """The vector selectors of an expression (the dashboard's and the rules' PromQL keeps them
    in the simple form this matches: a metric name and an optional ``{...}``)."""
    return {name + (matchers or "") for name, matchers in _SELECTOR.findall(expr)}


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in _SELECTOR.findall(expr)}


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start(name: str, argv: list[str], tmp: Path, stack: ExitStack) -> Process:
    log = tmp / f"{name}.log"
    out = stack.enter_context(log.open("wb"))
    popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_NO_PROXY_ENV)
    process = Process(name, popen, log)
    stack.callback(stop, process)
    return process


def stop(process: Process) -> None:
    """By PID: SIGTERM, then SIGKILL after 5 s."""
    if process.popen.poll() is None:
        process.popen.terminate()
        try:
            process.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.popen.kill()
    process.popen.wait(timeout=5)


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], *processes: Process) -> None:
    """Poll ``check`` until it holds; fail (with the logs) when a process exits or time is up."""
    deadline = time.monotonic() + _DEADLINE
    while time.monotonic() < deadline:
        for process in processes:
            if process.popen.poll() is not None:
                pytest.fail(
                    f"{process.name} exited ({process.popen.returncode}):\n{process.output()}"
                )
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.output()}" for p in processes)
    pytest.fail(f"{what}: not within {_DEADLINE} s\n{logs}")


def proxy_policy(
    upstream: str, listen: int, admin: int, store: str, prefix: str, on_error: str, token: str
) -> str:
    """With an admin token set, as in the Compose profile: Prometheus scrapes /metrics without
    it (the token guards only the keys API)."""
    return f"""
version: 1
listen: {HOST}:{listen}
admin: {{listen: "{HOST}:{admin}", token: "{token}"}}
upstream: {{url: "{upstream}"}}
store: {{url: "{store}", key_prefix: "{prefix}", on_error: {on_error}}}
routes:
  - name: create-order
    match: {{methods: [POST], path: /orders}}
    key: {{required: true}}
"""


@dataclass
class Stack:
    prometheus: str  # base URL
    healthy: str  # the fail_closed proxy on a real Redis: its base URL
    fail_open: str  # the fail_open proxy whose store is down
    targets: dict[str, str]  # role -> host:port of its admin listener, as Prometheus labels it
    processes: list[Process]


@pytest.fixture
async def stack(
    redis_server: RedisProcess, upstream: Upstream, prefix: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not on PATH (apt-get install prometheus)")
    with ExitStack() as exits:
        ports = {role: (free_port(), free_port()) for role in ("healthy", "fail_open")}
        dead_store = f"redis://{HOST}:{free_port()}/0"  # nothing listens there
        stores = {
            "healthy": (redis_server.url, "fail_closed"),
            "fail_open": (dead_store, "fail_open"),
        }
        proxies = []
        for role, (listen, admin) in ports.items():
            store, on_error = stores[role]
            policy = tmp_path / f"{role}.yaml"
            token = uuid.uuid4().hex
            policy.write_text(
                proxy_policy(upstream.url, listen, admin, store, prefix, on_error, token)
            )
            argv = [sys.executable, "-m", "idemproxy", "run", "-c", str(policy)]
            proxies.append(start(role, argv, tmp_path, exits))
        targets = {role: f"{HOST}:{admin}" for role, (_, admin) in ports.items()}
        targets["dead"] = f"{HOST}:{free_port()}"  # a scrape target that never answers
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "idemproxy",
                    "static_configs": [{"targets": sorted(targets.values())}],
                }
            ],
        }
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = start(
            "prometheus",
            [
                str(PROMETHEUS),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={HOST}:{port}",
                "--log.level=warn",
            ],
            tmp_path,
            exits,
        )
        processes = [*proxies, prometheus]
        base = f"http://{HOST}:{port}"
        async with aiohttp.ClientSession() as session:

            async def answers(url: str) -> bool:
                async with session.get(url) as response:
                    return response.status == 200

            for role in ("healthy", "fail_open"):
                healthz = f"http://{targets[role]}/healthz"
                await wait_for(f"{role} proxy healthy", partial(answers, healthz), *processes)
            await wait_for("prometheus ready", partial(answers, f"{base}/-/ready"), *processes)
        yield Stack(
            prometheus=base,
            healthy=f"http://{HOST}:{ports['healthy'][0]}",
            fail_open=f"http://{HOST}:{ports['fail_open'][0]}",
            targets=targets,
            processes=processes,
        )


class PrometheusAPI:
    def __init__(self, session: aiohttp.ClientSession, stack: Stack) -> None:
        self.session = session
        self.stack = stack

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.stack.prometheus}{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    async def total(self, instance: str) -> float:
        result = await self.query(f'sum(idemproxy_requests_total{{instance="{instance}"}})')
        return float(result[0]["value"][1]) if result else 0.0


async def send_traffic(
    http: aiohttp.ClientSession, upstream: Upstream, stack: Stack, round_: int
) -> dict[str, int]:
    """One round of every kind of request; returns how many requests each proxy answered."""
    orders = f"{stack.healthy}/orders"
    tag = f"{round_}-{uuid.uuid4().hex[:8]}"

    async def post(url: str, key: str, body: str, **headers: str) -> int:
        async with http.post(url, data=body, headers={"Idempotency-Key": key, **headers}) as r:
            await r.read()
            return r.status

    sent = 0
    for n in range(3):  # new keys, then their replays
        assert await post(orders, f"new-{tag}-{n}", f'{{"n": {n}}}') == 201
        assert await post(orders, f"new-{tag}-{n}", f'{{"n": {n}}}') == 201  # replayed
        sent += 2
    # A conflict: a retry while the first request with the key is still at the upstream.
    calls = len(upstream.calls)
    slow = asyncio.create_task(post(orders, f"slow-{tag}", "{}", **{"X-Test-Delay": "0.5"}))
    for _ in range(int(_DEADLINE / 0.01)):  # until the upstream has it (bounded)
        if len(upstream.calls) > calls:
            break
        await asyncio.sleep(0.01)
    assert await post(orders, f"slow-{tag}", "{}") == 409
    assert await slow == 201
    sent += 2
    # A mismatch: a key reused for another request.
    assert await post(orders, f"new-{tag}-0", '{"n": "other"}') == 422
    sent += 1
    # Pass-through: no route lists GET.
    async with http.get(orders) as response:
        await response.read()
        assert response.status == 201
    sent += 1
    # Gateway errors: the upstream drops the connection after reading the request.
    for n in range(3):
        assert await post(orders, f"drop-{tag}-{n}", "{}", **{"X-Test-Drop": "1"}) == 502
        sent += 1
    # The fail-open proxy's store is down: forwarded unprotected (the upstream's 201).
    for n in range(2):
        assert await post(f"{stack.fail_open}/orders", f"open-{tag}-{n}", "{}") == 201
    return {"healthy": sent, "fail_open": 2}


@needs_prometheus
async def test_every_dashboard_and_rule_expression_returns_data_on_a_real_prometheus(
    stack: Stack, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    healthy, fail_open, dead = (stack.targets[r] for r in ("healthy", "fail_open", "dead"))
    async with aiohttp.ClientSession() as session:
        api = PrometheusAPI(session, stack)

        # Two rounds of traffic, each seen by a scrape, so every counter and histogram series
        # exists before its last increase and rate() over the window is above zero.
        expected = {"healthy": 0.0, "fail_open": 0.0}
        for round_ in range(2):
            for role, count in (await send_traffic(http, upstream, stack, round_)).items():
                expected[role] += count

            async def scraped() -> bool:
                return (
                    await api.total(healthy) == expected["healthy"]
                    and await api.total(fail_open) == expected["fail_open"]
                )

            await wait_for(f"round {round_} scraped", scraped, *stack.processes)
        traffic_done = time.monotonic()

        # What idemproxy exports, from its own /metrics, now that every kind of request ran.
        async with session.get(f"http://{healthy}/metrics") as response:
            exposition = await response.text()
        exported = {
            sample.name
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples
        } | {"up"}

        # Every name the dashboard and the rules use is exported, or listed as not yet.
        expressions = [(title, substitute(expr)) for title, expr in dashboard_targets()]
        expressions += [(rule["alert"], rule["expr"]) for rule in rules()]
        used = set().union(*(metric_names(expr) for _, expr in expressions))
        unknown = used - exported - set(NOT_YET_EXPORTED)
        assert not unknown, f"not exported by idemproxy: {sorted(unknown)}"
        absent = set(NOT_YET_EXPORTED) - exported
        for name in sorted(absent):
            print(f"tolerated, not exported yet: {name} ({NOT_YET_EXPORTED[name]})")

        # The dashboard's variables.
        for label, wanted in (("job", {"idemproxy"}), ("instance", {healthy, fail_open})):
            values = await api.get(
                f"/api/v1/label/{label}/values", **{"match[]": "idemproxy_locks_in_flight"}
            )
            assert wanted <= set(values), (label, values)

        # Every expression, and every selector in it.
        rule_results = {}
        empty: list[str] = []
        checked_selectors: set[str] = set()
        for title, expr in expressions:
            result = await api.query(expr)
            waiting = metric_names(expr) & absent
            if title in EXPECTED_EMPTY or waiting:
                reason = EXPECTED_EMPTY.get(title) or f"waits for {sorted(waiting)}"
                assert result == [], f"{title}: expected empty ({reason}), got {result}"
                empty.append(f"{title} ({reason})")
            else:
                assert result, f"{title}: no data for {expr}"
                values = [float(sample["value"][1]) for sample in result]
                assert any(math.isfinite(v) for v in values), f"{title}: {values} for {expr}"
            if title in {rule["alert"] for rule in rules()}:
                rule_results[title] = result
            # An empty or thresholded expression proves little: each selector in it must have
            # data, so a misspelt metric, label or value cannot hide behind an empty result.
            for selector in selectors(expr) - checked_selectors:
                if metric_names(selector) & absent:
                    continue
                tolerated = metric_names(selector) & set(NOT_YET_EXPORTED)
                assert await api.query(selector), f"{title}: no data for {selector}" + (
                    f"; {sorted(tolerated)} is exported now: make the traffic produce it, "
                    "or list what stays empty in EXPECTED_EMPTY"
                    if tolerated
                    else ""
                )
                checked_selectors.add(selector)

        # What the alerts see in this traffic, exactly.
        def instances(alert: str) -> set[str]:
            return {sample["metric"].get("instance", "") for sample in rule_results[alert]}

        assert instances("IdemproxyTargetDown") == {dead}
        assert instances("IdemproxyStoreErrors") == {fail_open}
        assert instances("IdemproxyFailOpenForwarding") == {fail_open}
        assert [s["metric"] for s in rule_results["IdemproxyHighErrorRatio"]] == [
            {"job": "idemproxy"}
        ]

        # Prometheus evaluates every rule without an error, and those alerts are pending.
        async def evaluated() -> bool:
            groups = (await api.get("/api/v1/rules"))["groups"]
            loaded = [rule for group in groups for rule in group["rules"]]
            assert {r["name"] for r in loaded} == {r["alert"] for r in rules()}
            for rule in loaded:
                assert rule["health"] in {"ok", "unknown"}, rule
            active = {
                (a["labels"]["alertname"], a["labels"].get("instance", ""))
                for a in (await api.get("/api/v1/alerts"))["alerts"]
                if a["state"] in {"pending", "firing"}
            }
            return all(rule["health"] == "ok" for rule in loaded) and active == {
                ("IdemproxyTargetDown", dead),
                ("IdemproxyStoreErrors", fail_open),
                ("IdemproxyFailOpenForwarding", fail_open),
                ("IdemproxyHighErrorRatio", ""),
            }

        await wait_for("alerts pending", evaluated, *stack.processes)
    print(
        f"{len(expressions)} expressions checked ({len(dashboard_targets())} dashboard queries, "
        f"{len(rules())} alert rules), {len(checked_selectors)} distinct selectors in them; "
        f"empty as expected: {'; '.join(empty)}; traffic and scrapes "
        f"{traffic_done - started:.1f} s, all {time.monotonic() - started:.1f} s"
    )
