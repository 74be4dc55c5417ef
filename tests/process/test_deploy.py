"""The deployment files: Dockerfile, .dockerignore, docker-compose.yml, deploy/policy.yaml and
deploy/kubernetes/.

No Docker engine and no cluster are needed. The files are parsed and their wiring is checked
against each other (service names, ports, probes, the environment variables the policies read,
where the policy is mounted); both policies go through ``idemproxy check``; and the image's
entrypoint, ``idemproxy run`` with ``IDEMPROXY_CONFIG=deploy/policy.yaml``, runs as a real process
in front of the demo upstream, on loopback ports only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from idemproxy.policy_values import is_loopback, parse_duration, parse_host_port
from tests.conftest import HOST, free_port, run_cli

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
POLICY = ROOT / "deploy" / "policy.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"

PROXY_PORT, ADMIN_PORT, DEMO_PORT = 8080, 9901, 8000
IMAGE_UID = 10001
POLICY_ENV = {
    "UPSTREAM_URL",
    "IDEMPROXY_STORE_URL",
    "IDEMPROXY_CONFIG",
    "IDEMPROXY_ADMIN_LISTEN",
    "IDEMPROXY_ADMIN_TOKEN",
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


@pytest.fixture(autouse=True)
def no_policy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_cli passes os.environ on: a stray UPSTREAM_URL or store URL must not decide a test."""
    for name in POLICY_ENV:
        monkeypatch.delenv(name, raising=False)


# --- reading the files -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), self
        return [str(item) for item in value]


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile as stages of instructions: comments dropped, continuations joined."""
    stages: list[list[Instruction]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also the parser directive and comment lines inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{instruction.keyword} before the first FROM"
        stages[-1].append(instruction)
    assert not pending, "the Dockerfile ends inside a continuation"
    return stages


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the stage, got {found}"
    return found[0]


def runs(stage: list[Instruction]) -> str:
    return "\n".join(i.args for i in stage if i.keyword == "RUN")


def dockerfile_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                name, equals, value = word.partition("=")
                assert equals, f"write ENV NAME=VALUE: {instruction.args}"
                env[name] = value
    return env


def copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """COPY [--flag=value ...] SRC... DEST -> (flags, sources, destination)."""
    words = shlex.split(instruction.args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (Docker's rules: patterns in
    order, the last one that matches the path or one of its parent directories wins)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        matcher = regex(pattern.lstrip("!").strip("/"))
        if any(matcher.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return dict(services[name])


def compose_env(svc: Mapping[str, Any], shell: Mapping[str, str] | None = None) -> dict[str, str]:
    """The service's environment as Compose hands it to the container, with ``${VAR}`` and
    ``${VAR:-default}`` interpolated from the ``shell`` that runs ``docker compose`` (default:
    an empty one)."""

    def interpolate(match: re.Match[str]) -> str:
        return (shell or {}).get(match.group(1)) or (match.group(2) or ":-")[2:]

    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    interpolated = {str(k): _ENV_REF.sub(interpolate, str(v)) for k, v in env.items()}
    for name, value in interpolated.items():
        assert "$" not in value, f"{name}: an interpolation these tests do not know: {value}"
    return interpolated


def as_argv(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list)
    return [str(v) for v in value]


def kube_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert isinstance(document, dict), path
                assert "kind" in document, path
                documents.append({**document, "_file": path.name})
    return documents


def kube(kind: str) -> dict[str, Any]:
    found = [d for d in kube_documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, got {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return dict(kube("Deployment")["spec"]["template"]["spec"])


def container(name: str) -> dict[str, Any]:
    containers = {c["name"]: c for c in pod_spec()["containers"]}
    assert name in containers, f"the Deployment has no container {name!r}"
    return dict(containers[name])


def container_env(c: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def container_port(c: Mapping[str, Any], port: int | str) -> int:
    """A containerPort by number or by name."""
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert port in named, f"container {c['name']} has no port named {port!r}"
    return int(named[port])


def configmap_policy() -> str:
    data = kube("ConfigMap")["data"]
    assert list(data) == ["policy.yaml"], list(data)
    return str(data["policy.yaml"])


def env_refs(text: str) -> dict[str, bool]:
    """The ${VAR} references of a policy text -> whether each has a default."""
    refs: dict[str, bool] = {}
    for match in _ENV_REF.finditer(text):
        refs[match.group(1)] = refs.get(match.group(1), False) or match.group(2) is not None
    return refs


def expand(text: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """The policy as idemproxy reads it: ${VAR} / ${VAR:-default} expanded from ``environ``."""

    def substitute(match: re.Match[str]) -> str:
        value = environ.get(match.group(1), "")
        return value or (match.group(2) or ":-")[2:]

    document = yaml.safe_load(_ENV_REF.sub(substitute, text))
    assert isinstance(document, dict)
    return document


# --- the Dockerfile --------------------------------------------------------------------------


def test_dockerfile_builds_a_wheel_and_installs_it_in_a_slim_runtime() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    builder, runtime = stages[0], stages[-1]
    bases = [shlex.split(stage[0].args) for stage in stages]
    # The runtime installs the builder's wheels with --no-index: the environment markers of the
    # resolved dependencies only hold for the very same interpreter, so the bases must match.
    for base in bases:
        assert base[0] == "python:3.11-slim", base
    assert len(bases[0]) == 3, "name the builder stage"
    assert bases[0][1].upper() == "AS", bases[0]
    builder_name = bases[0][2]
    assert "pip wheel" in runs(builder)
    install = runs(runtime)
    assert "pip install" in install, install
    assert "--no-index" in install, install
    assert f"from={builder_name}" in install, "the runtime must install the builder's wheels"
    assert "pip wheel" not in install


def test_dockerfile_installs_uvloop_and_hiredis() -> None:
    """They are dependencies of the package; the image build fails if either does not import."""
    dependencies = [d.replace(" ", "") for d in _pyproject()["project"]["dependencies"]]
    assert any(d.startswith("uvloop") for d in dependencies), dependencies
    assert any(d.startswith("redis[hiredis]") for d in dependencies), dependencies
    imports = re.findall(r"import ([\w, ]+)", runs(dockerfile_stages()[-1]))
    imported = {name.strip() for found in imports for name in found.split(",")}
    assert {"idemproxy", "uvloop", "hiredis"} <= imported, imports


def test_dockerfile_image_can_trace() -> None:
    """The builder resolves the otel extra and the runtime imports idemproxy.otel, so that
    ``tracing.endpoint`` works in the image instead of leaving tracing off."""
    assert "'.[otel]'" in runs(dockerfile_stages()[0])
    assert "idemproxy.otel" in runs(dockerfile_stages()[-1])


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    runtime = dockerfile_stages()[-1]
    users = [i for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid, _, gid = users[-1].args.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without an /etc/passwd lookup.
    assert uid == str(IMAGE_UID), users[-1]
    assert gid in ("", str(IMAGE_UID)), users[-1]
    assert f"--uid {IMAGE_UID}" in runs(runtime)
    # Nothing after USER runs as root by accident: the entrypoint comes after it.
    keywords = [i.keyword for i in runtime]
    assert keywords.index("ENTRYPOINT") > keywords.index("USER")


def test_dockerfile_environment_and_policy_location() -> None:
    runtime = dockerfile_stages()[-1]
    env = dockerfile_env(runtime)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    copies = [copy_parts(i) for i in runtime if i.keyword == "COPY"]
    policy_copies = [c for c in copies if c[1] == ["deploy/policy.yaml"]]
    assert len(policy_copies) == 1, copies
    flags, _, destination = policy_copies[0]
    assert env.get("IDEMPROXY_CONFIG") == destination == "/etc/idemproxy/policy.yaml"
    assert "from" not in flags, "the policy comes from the build context"
    # Root owns it; the proxy's user only reads it.
    assert flags.get("chown", "root:root").split(":")[0] in ("root", "0")


def test_dockerignore_lets_in_exactly_what_the_image_copies() -> None:
    copied = [
        source
        for stage in dockerfile_stages()
        for instruction in stage
        if instruction.keyword == "COPY"
        for flags, sources, _ in [copy_parts(instruction)]
        if "from" not in flags
        for source in sources
    ]
    assert copied, "the Dockerfile copies nothing from the build context"
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source), f".dockerignore keeps out {source}"
    # Every file of the package (modules and package data) reaches the wheel.
    for package_file in (ROOT / "idemproxy").rglob("*"):
        relative = package_file.relative_to(ROOT).as_posix()
        if package_file.is_file() and "__pycache__" not in relative:
            assert not dockerignore_excludes(relative), relative
    for kept_out in (
        ".git/config",
        "tests/conftest.py",
        ".venv/bin/python",
        "idemproxy/__pycache__/cli.cpython-311.pyc",
        "idemproxy.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(kept_out), kept_out


def test_dockerfile_ports_healthcheck_and_entrypoint() -> None:
    runtime = dockerfile_stages()[-1]
    exposed = {
        int(p.split("/")[0]) for i in runtime if i.keyword == "EXPOSE" for p in i.args.split()
    }
    assert exposed == {PROXY_PORT, ADMIN_PORT}
    policy = expand(POLICY.read_text(), {})
    assert parse_host_port(policy["listen"])[1] == PROXY_PORT
    assert parse_host_port(policy["admin"]["listen"])[1] == ADMIN_PORT
    argv = healthcheck_argv()
    assert argv[0] == "python", "slim images have no curl"
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in argv[-1]
    assert only(runtime, "ENTRYPOINT").exec_form() == ["idemproxy"]
    assert only(runtime, "CMD").exec_form() == ["run"]


def healthcheck_argv() -> list[str]:
    args = only(dockerfile_stages()[-1], "HEALTHCHECK").args
    options, cmd, command = args.partition("CMD ")
    assert cmd, f"HEALTHCHECK needs CMD: {args}"
    assert "--timeout=" in options, options
    assert "--interval=" in options, options
    return Instruction("CMD", command).exec_form()


# --- the policy the image ships --------------------------------------------------------------


def test_container_policy_passes_check_listens_for_the_outside_and_keeps_admin_inside() -> None:
    result = run_cli("check", "-c", str(POLICY))
    assert result.returncode == 0, result.stderr
    assert re.search(r"\b2 route\(s\), 2 keyed, store memory://$", result.stdout.strip())
    policy = expand(POLICY.read_text(), {})
    # In a container, loopback would be unreachable from a published port or a probe.
    assert parse_host_port(policy["listen"]) == ("0.0.0.0", PROXY_PORT)
    # The admin listener has no token by default, so it stays on loopback, where the image's
    # HEALTHCHECK (which runs inside the container) still reaches it.
    assert parse_host_port(policy["admin"]["listen"]) == ("127.0.0.1", ADMIN_PORT)
    assert not policy["admin"].get("token"), "the shipped policy keeps the keys API off"
    assert env_refs(POLICY.read_text()) == {
        "UPSTREAM_URL": True,
        "IDEMPROXY_STORE_URL": True,
        "IDEMPROXY_ADMIN_LISTEN": True,
        "IDEMPROXY_ADMIN_TOKEN": True,
    }
    assert policy["upstream"]["url"] == f"http://127.0.0.1:{DEMO_PORT}"
    assert policy["store"]["url"] == "memory://"
    routes = {r["name"]: r for r in policy["routes"]}
    assert routes["create-order"]["match"] == {"methods": ["POST"], "path": "/orders"}
    assert routes["create-order"]["key"]["required"] is True


def test_container_policy_opens_admin_to_the_outside_only_with_a_token() -> None:
    outside = {"IDEMPROXY_ADMIN_LISTEN": f"0.0.0.0:{ADMIN_PORT}"}
    result = run_cli("check", "-c", str(POLICY), env=outside)
    assert result.returncode == 1, result.stdout
    token_line = POLICY.read_text().splitlines().index("  token: ${IDEMPROXY_ADMIN_TOKEN:-}") + 1
    assert f"{POLICY}:{token_line}: admin.token: " in result.stderr
    assert "127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(
        "check", "-c", str(POLICY), env={**outside, "IDEMPROXY_ADMIN_TOKEN": "a-secret"}
    )
    assert result.returncode == 0, result.stderr


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_redis_keeps_keys() -> None:
    redis_service = service("redis")
    # Pinned to a release, never a moving major tag.
    assert _PINNED_TAG.fullmatch(redis_service["image"]), redis_service["image"]
    assert redis_service["image"].startswith("redis:7.")
    command = as_argv(redis_service["command"])
    pairs = dict(zip(command[1::2], command[2::2], strict=False))
    assert command[0] == "redis-server", command
    assert pairs.get("--appendonly") == "yes", command
    assert pairs.get("--maxmemory-policy") == "noeviction", command
    test = as_argv(redis_service["healthcheck"]["test"])
    assert test[-2:] == ["redis-cli", "ping"], test


def test_compose_upstream_is_the_demo_from_the_same_image() -> None:
    upstream = service("upstream")
    proxy = service("idemproxy")
    assert upstream["build"] == proxy["build"]
    assert upstream["build"]["context"] == "."
    assert (ROOT / upstream["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    argv = as_argv(upstream["entrypoint"]) + as_argv(upstream.get("command"))
    assert argv == shlex.split(f"python -m idemproxy.demo --host 0.0.0.0 --port {DEMO_PORT}")
    # The image's health check asks the admin port, which the demo does not have.
    test = " ".join(as_argv(upstream["healthcheck"]["test"]))
    assert str(ADMIN_PORT) not in test, test
    assert str(DEMO_PORT) in test, test


def test_compose_idemproxy_wiring() -> None:
    services = compose()["services"]
    proxy = service("idemproxy")
    assert proxy["build"]["context"] == "."
    # The image's own entrypoint and command: idemproxy run.
    assert "entrypoint" not in proxy
    assert "command" not in proxy

    env = compose_env(proxy)
    assert set(env_refs(POLICY.read_text())) <= set(env), env
    upstream_url = urlsplit(env["UPSTREAM_URL"])
    assert upstream_url.hostname in services
    assert upstream_url.hostname == "upstream"
    assert upstream_url.port == DEMO_PORT
    store_url = urlsplit(env["IDEMPROXY_STORE_URL"])
    assert store_url.scheme == "redis"
    assert store_url.hostname == "redis"
    assert store_url.port == 6379

    # The admin listener stays on the container's loopback (see the next test): a published
    # admin port would reach nothing.
    assert set(proxy["ports"]) == {f"{PROXY_PORT}:{PROXY_PORT}"}
    assert proxy["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "upstream": {"condition": "service_started"},
    }
    config_path = dockerfile_env(dockerfile_stages()[-1])["IDEMPROXY_CONFIG"]
    mounts = [as_mount(v) for v in proxy["volumes"]]
    assert ("./deploy/policy.yaml", config_path, "ro") in mounts, mounts
    grace = parse_duration(proxy["stop_grace_period"])
    assert grace > parse_duration(expand(POLICY.read_text(), env)["shutdown_timeout"])


def as_mount(volume: str | dict[str, Any]) -> tuple[str, str, str]:
    if isinstance(volume, dict):
        return volume["source"], volume["target"], "ro" if volume.get("read_only") else "rw"
    source, target, *mode = volume.split(":")
    return source, target, mode[0] if mode else "rw"


@pytest.mark.parametrize(
    "shell", [{}, {"IDEMPROXY_ADMIN_TOKEN": "a-secret"}], ids=["no-token", "token"]
)
def test_compose_environment_makes_a_valid_redis_policy(shell: dict[str, str]) -> None:
    env = compose_env(service("idemproxy"), shell)
    result = run_cli("check", "-c", str(POLICY), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("store redis://"), result.stdout
    policy = expand(POLICY.read_text(), env)
    assert is_loopback(parse_host_port(policy["admin"]["listen"])[0])
    assert policy["admin"]["token"] == shell.get("IDEMPROXY_ADMIN_TOKEN")  # YAML: empty is null


# --- docker-compose.yml: the observability profile ---------------------------------------------

OBSERVABILITY = ROOT / "deploy" / "observability"
PROFILE = "observability"
PROFILE_SHELL = {
    "IDEMPROXY_ADMIN_LISTEN": f"0.0.0.0:{ADMIN_PORT}",
    "IDEMPROXY_ADMIN_TOKEN": "s3cr3t",
}
_PINNED_TAG = re.compile(r"[^:\s]+:v?\d+\.\d+\.\d+(-[a-z0-9.]+)?")  # a release, maybe a variant


def mounts_of(name: str) -> dict[str, tuple[Path, str]]:
    """A service's bind mounts: container path -> (path in this repository, mode)."""
    found = {}
    for volume in service(name).get("volumes", []):
        source, target, mode = as_mount(volume)
        if source.startswith("./"):
            found[target] = ((ROOT / source).resolve(), mode)
    return found


def in_container(name: str, path: str) -> Path:
    """The repository file a service sees at ``path``, through its read-only bind mounts."""
    for target, (source, mode) in mounts_of(name).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            assert mode == "ro", (name, target)
            found = source / path[len(target) :].lstrip("/")
            assert found.exists(), (name, path, found)
            return found
    raise AssertionError(f"{name} sees nothing at {path}")


def test_compose_observability_services_are_only_in_their_profile() -> None:
    services = compose()["services"]
    profiled = {name for name, svc in services.items() if svc.get("profiles")}
    assert profiled == {"prometheus", "grafana"}, profiled
    for name in profiled:
        assert services[name]["profiles"] == [PROFILE]
        # Pinned to a release, never `latest` or a moving major tag.
        assert _PINNED_TAG.fullmatch(services[name]["image"]), services[name]["image"]
        assert services[name]["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in services[name]["security_opt"], name
        # Published on this machine's loopback only.
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), (name, port)
    for svc in services.values():
        if "image" in svc:
            assert ":" in svc["image"], svc["image"]
            assert not svc["image"].endswith(":latest"), svc["image"]
    # The default stack does not depend on the profile's services.
    for name in set(services) - profiled:
        assert not set(services[name].get("depends_on") or {}) & profiled, name


def test_compose_prometheus_scrapes_the_admin_listener_and_loads_the_alerts() -> None:
    prometheus = service("prometheus")
    flags = dict(arg.partition("=")[::2] for arg in as_argv(prometheus["command"]))
    config_file = in_container("prometheus", flags["--config.file"])
    assert config_file == (OBSERVABILITY / "prometheus" / "prometheus.yml").resolve()
    assert flags["--storage.tsdb.path"] in {
        as_mount(v)[1] for v in prometheus["volumes"] if not as_mount(v)[0].startswith(".")
    }, "the TSDB lives in a named volume"
    config = yaml.safe_load(config_file.read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, as Prometheus reads it
        container_path = str(Path(flags["--config.file"]).parent / rule_file)
        assert (
            in_container("prometheus", container_path)
            == (OBSERVABILITY / "prometheus" / "alerts.yml").resolve()
        )
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "idemproxy"]
    # The alerts' IdemproxyTargetDown selects job="idemproxy".
    assert 'up{job="idemproxy"}' in (OBSERVABILITY / "prometheus" / "alerts.yml").read_text()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"
    # /metrics needs no credentials; the admin token (it can delete keys) is not handed out.
    assert not {"authorization", "basic_auth", "oauth2"} & set(job), job
    (target,) = [t for static in job["static_configs"] for t in static["targets"]]
    host, port = parse_host_port(target)
    assert host == "idemproxy", target
    assert host in compose()["services"], target
    # ... on the admin port of the policy as the profile's shell variables make it.
    policy = expand(POLICY.read_text(), compose_env(service("idemproxy"), PROFILE_SHELL))
    admin_host, admin_port = parse_host_port(policy["admin"]["listen"])
    assert port == admin_port == ADMIN_PORT
    assert not is_loopback(admin_host), "Prometheus could not reach a loopback listener"
    assert "idemproxy" in (prometheus.get("depends_on") or {})


def test_compose_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = service("grafana")
    datasources_dir = in_container("grafana", "/etc/grafana/provisioning/datasources")
    (datasource,) = yaml.safe_load((datasources_dir / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus"
    assert url.hostname in compose()["services"]
    flags = dict(arg.partition("=")[::2] for arg in as_argv(service("prometheus")["command"]))
    assert url.port == parse_host_port(flags.get("--web.listen-address", "0.0.0.0:9090"))[1]
    scrape = yaml.safe_load((OBSERVABILITY / "prometheus" / "prometheus.yml").read_text())
    assert datasource["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]

    providers_dir = in_container("grafana", "/etc/grafana/provisioning/dashboards")
    (provider,) = yaml.safe_load((providers_dir / "idemproxy.yml").read_text())["providers"]
    dashboards = in_container("grafana", provider["options"]["path"])
    assert dashboards == (OBSERVABILITY / "grafana" / "dashboards").resolve()
    model = json.loads((dashboards / "idemproxy.json").read_text())
    home = compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert json.loads(in_container("grafana", home).read_text())["uid"] == model["uid"]
    # The dashboard's panels ask the data source its variable picks: the provisioned default.
    (variable,) = [v for v in model["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == datasource["type"]
    assert "prometheus" in (grafana.get("depends_on") or {})


def test_compose_profile_environment_opens_the_admin_listener_only_with_a_token() -> None:
    env = compose_env(service("idemproxy"), PROFILE_SHELL)
    result = run_cli("check", "-c", str(POLICY), env=env)
    assert result.returncode == 0, result.stderr
    without_token = compose_env(service("idemproxy"), {"IDEMPROXY_ADMIN_LISTEN": "0.0.0.0:9901"})
    result = run_cli("check", "-c", str(POLICY), env=without_token)
    assert result.returncode == 1, result.stdout
    assert "admin.token" in result.stderr, result.stderr


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) when the plugin answers, else ``docker-compose``, else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize(
    ("profile", "shell"),
    [(None, {}), (PROFILE, PROFILE_SHELL)],
    ids=["default", "observability"],
)
def test_compose_config_validates(
    profile: str | None, shell: dict[str, str], tmp_path: Path
) -> None:
    """``docker compose config`` parses, interpolates and validates the file (no engine needed)."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    env_file = tmp_path / "empty.env"  # a developer's .env must not decide the test
    env_file.write_text("")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    environ = {k: v for k, v in environ.items() if k not in POLICY_ENV} | shell
    argv = [*command, "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    argv += ["--env-file", str(env_file)]
    if profile:
        argv += ["--profile", profile]
    result = subprocess.run(
        [*argv, "config"], capture_output=True, text=True, timeout=60, env=environ, check=False
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert {"redis", "upstream", "idemproxy"} <= set(resolved)
    admin = resolved["idemproxy"]["environment"]["IDEMPROXY_ADMIN_LISTEN"]
    assert admin == shell.get("IDEMPROXY_ADMIN_LISTEN", f"127.0.0.1:{ADMIN_PORT}")
    if profile:
        assert {"prometheus", "grafana"} <= set(resolved)
        for name in ("prometheus", "grafana"):
            assert resolved[name]["profiles"] == [profile]


# --- deploy/kubernetes -----------------------------------------------------------------------


def test_kubernetes_files_hold_one_configmap_deployment_and_service() -> None:
    kinds = sorted(d["kind"] for d in kube_documents())
    assert kinds == ["ConfigMap", "Deployment", "Kustomization", "Service"]
    listed = kube("Kustomization")["resources"]
    files = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files


KUBE_ENV = {"IDEMPROXY_STORE_URL": "redis://r:6379/0", "IDEMPROXY_ADMIN_TOKEN": "a-secret"}


def test_kubernetes_policy_passes_check_with_a_store_url_and_an_admin_token(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(configmap_policy())
    result = run_cli("check", "-c", str(path), env=KUBE_ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("store redis://"), result.stdout
    # Several replicas must share their keys: without a store URL the sidecar refuses to start
    # instead of falling back to a per-pod memory store.
    result = run_cli("check", "-c", str(path), env={"IDEMPROXY_ADMIN_TOKEN": "a-secret"})
    assert result.returncode == 1
    assert "store.url" in result.stderr
    assert "IDEMPROXY_STORE_URL" in result.stderr
    # The probes need the admin listener on the pod IP, so it needs a token: unset or empty,
    # the sidecar refuses to start.
    no_token = {"IDEMPROXY_STORE_URL": "redis://r:6379/0"}
    result = run_cli("check", "-c", str(path), env=no_token)
    assert result.returncode == 1
    assert "admin.token" in result.stderr
    assert "IDEMPROXY_ADMIN_TOKEN" in result.stderr
    result = run_cli("check", "-c", str(path), env={**no_token, "IDEMPROXY_ADMIN_TOKEN": ""})
    assert result.returncode == 1
    assert "admin.token: the admin listener would listen on 0.0.0.0" in result.stderr


def test_kubernetes_sidecar_ports_and_probes() -> None:
    policy = expand(configmap_policy(), KUBE_ENV)
    sidecar, app = container("idemproxy"), container("my-api")
    assert parse_host_port(policy["listen"]) == ("0.0.0.0", container_port(sidecar, "proxy"))
    admin = parse_host_port(policy["admin"]["listen"])
    assert admin == ("0.0.0.0", ADMIN_PORT) == ("0.0.0.0", container_port(sidecar, "admin"))
    # Reachable from the whole cluster, so the token is required (no default) ...
    assert env_refs(configmap_policy())["IDEMPROXY_ADMIN_TOKEN"] is False
    assert policy["admin"]["token"] == KUBE_ENV["IDEMPROXY_ADMIN_TOKEN"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(sidecar, get["port"]) == ADMIN_PORT, probe
    # The upstream is the app container of the same pod, over loopback.
    upstream = urlsplit(policy["upstream"]["url"])
    assert upstream.hostname == "127.0.0.1"
    assert upstream.port == container_port(app, "app") == DEMO_PORT
    assert "image" in app
    assert app["image"].split("/")[-1].startswith("my-api")


def test_kubernetes_policy_mount_and_environment() -> None:
    sidecar = container("idemproxy")
    env = container_env(sidecar)
    config_path = env["IDEMPROXY_CONFIG"]["value"]
    assert config_path == dockerfile_env(dockerfile_stages()[-1])["IDEMPROXY_CONFIG"]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    configmap = kube("ConfigMap")
    mounted = []
    for mount in sidecar["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        assert source["name"] == configmap["metadata"]["name"]
        assert mount.get("readOnly") is True
        for item in source.get("items") or [{"key": k, "path": k} for k in configmap["data"]]:
            assert item["key"] in configmap["data"], item
            mounted.append(f"{mount['mountPath'].rstrip('/')}/{item['path']}")
    assert config_path in mounted, mounted
    # Every ${VAR} the policy reads without a default is provided, the store from a Secret.
    for name, has_default in env_refs(configmap_policy()).items():
        assert has_default or name in env, name
    # ... the store URL and the admin token (both credentials) from Secrets.
    for name in ("IDEMPROXY_STORE_URL", "IDEMPROXY_ADMIN_TOKEN"):
        secret = env[name]["valueFrom"]["secretKeyRef"]
        assert secret["name"], name
        assert secret["key"], name


def test_kubernetes_sidecar_security_and_resources() -> None:
    sidecar = container("idemproxy")
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("runAsUser", IMAGE_UID) == IMAGE_UID
    assert "ALL" in security["capabilities"]["drop"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(sidecar["resources"][bound]), bound
    policy = expand(configmap_policy(), KUBE_ENV)
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > parse_duration(policy["shutdown_timeout"])


def test_kubernetes_service_targets_the_sidecar_not_the_app() -> None:
    deployment, svc = kube("Deployment"), kube("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    sidecar, app = container("idemproxy"), container("my-api")
    app_ports = {p["containerPort"] for p in app.get("ports", [])} | {
        p["name"] for p in app.get("ports", []) if "name" in p
    }
    assert svc["spec"]["ports"]
    for port in svc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target not in app_ports, f"the Service bypasses the proxy: {port}"
        assert container_port(sidecar, target) == PROXY_PORT, port


# --- the image's entrypoint as a real process ------------------------------------------------


_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with _OPENER.open(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        try:
            return error.code, error.headers, error.read()
        finally:
            error.close()


def accepts(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    """Poll ``ready`` for up to 10 s; fail at once if ``process`` exits."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{what} was not ready within 10 s:\n{log.read_text()}")


def healthcheck(admin_port: int) -> int:
    """The Dockerfile's HEALTHCHECK command, aimed at ``admin_port`` instead of 9901."""
    argv = healthcheck_argv()
    code = argv[-1].replace(f"127.0.0.1:{ADMIN_PORT}/", f"{HOST}:{admin_port}/")
    assert code != argv[-1]
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    argv = [sys.executable, *argv[1:-1], code]
    return subprocess.run(argv, env=env, capture_output=True, timeout=10, check=False).returncode


def start(
    argv: list[str], log: Path, stack: ExitStack, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    out = stack.enter_context(log.open("wb"))
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 5 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=5)


def redis_keys(store_url: str) -> set[bytes]:
    """The keys under the container policy's prefix, in a Redis store."""
    if not store_url.startswith("redis://"):
        return set()
    with redis.Redis.from_url(store_url) as client:
        return set(client.scan_iter(match="idem:*"))


def test_image_entrypoint_serves_replays_and_exits_0_on_sigterm(
    tmp_path: Path, store_url: str
) -> None:
    """``idemproxy run`` with the image's config path and Compose's environment variables."""
    runtime = dockerfile_stages()[-1]
    command = only(runtime, "ENTRYPOINT").exec_form() + only(runtime, "CMD").exec_form()
    assert command[0] == "idemproxy"
    listen, admin, demo = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env |= dockerfile_env(runtime) | {
        "IDEMPROXY_CONFIG": str(POLICY),  # the image copies this file to its IDEMPROXY_CONFIG
        "UPSTREAM_URL": f"http://{HOST}:{demo}",
        "IDEMPROXY_STORE_URL": store_url,
    }
    keys_before = redis_keys(store_url)
    processes: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        try:
            demo_log, proxy_log = tmp_path / "demo.log", tmp_path / "proxy.log"
            upstream = start(
                [sys.executable, "-m", "idemproxy.demo", "--host", HOST, "--port", str(demo)],
                demo_log,
                stack,
                env,
            )
            processes.append(upstream)
            wait_until(lambda: accepts(demo), upstream, demo_log, "the demo upstream")
            # The image's command, but on loopback ports: nothing here binds 0.0.0.0.
            argv = [
                sys.executable,
                "-m",
                *command,
                "--listen",
                f"{HOST}:{listen}",
                "--admin",
                f"{HOST}:{admin}",
            ]
            proxy = start(argv, proxy_log, stack, env)
            processes.append(proxy)
            admin_url = f"http://{HOST}:{admin}"
            wait_until(
                lambda: http("GET", f"{admin_url}/healthz")[0] == 200, proxy, proxy_log, "idemproxy"
            )
            assert healthcheck(admin) == 0
            assert http("GET", f"{admin_url}/readyz")[0] == 200

            orders = f"http://{HOST}:{listen}/orders"
            key = f"deploy-{uuid.uuid4().hex}"
            json_type = {"Content-Type": "application/json"}
            # The policy's create-order route is in force (built-in defaults would forward it).
            status, _, body = http("POST", orders, b'{"sku": "tea"}', json_type)
            assert status == 400, body
            assert json.loads(body)["code"] == "idempotency_key_missing"

            headers = {"Idempotency-Key": key, **json_type}
            status, first_headers, first = http(
                "POST", orders, b'{"sku": "tea", "qty": 1}', headers
            )
            assert status == 201, first
            assert "Idempotent-Replayed" not in first_headers
            status, second_headers, second = http(
                "POST", orders, b'{"qty": 1, "sku": "tea"}', headers
            )
            assert status == 201, second
            assert second_headers["Idempotent-Replayed"] == "true"
            assert second == first
            number = json.loads(first)["order"]
            assert json.loads(second)["order"] == number
            # The upstream is the live demo: a new key makes a new order.
            other = {"Idempotency-Key": f"{key}-2", **json_type}
            status, _, third = http("POST", orders, b'{"sku": "tea", "qty": 1}', other)
            assert status == 201, third
            assert json.loads(third)["order"] == number + 1
            if store_url.startswith("redis://"):  # the store URL came from the environment
                assert len(redis_keys(store_url) - keys_before) == 2

            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(timeout=15) == 0, proxy_log.read_text()
            assert "Traceback" not in proxy_log.read_text()
            assert healthcheck(admin) != 0, "the health check must fail once the proxy is gone"
        finally:
            # SIGTERM (then SIGKILL) whatever still runs: the demo upstream, or a failed proxy.
            for process in processes:
                stop(process)
