"""The admin listener binds a non-loopback address only with a token (``admin.token``).

No test here binds anything but loopback: a refused config stops before any socket is opened,
and the accepted non-loopback cases only go through ``idemproxy check``. The ``run`` cases use
policies without an upstream, so even a broken check would end in "no upstream" instead of
binding 0.0.0.0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from idemproxy.config import ConfigError, Overrides, load_text
from idemproxy.policy_values import is_loopback
from tests.conftest import run_cli

OUTSIDE = ["0.0.0.0:9901", ":9901", "10.1.2.3:9901", "[::]:9901", "admin.example.com:9901"]
LOOPBACK = [
    "127.0.0.1:9901",
    "127.0.0.2:9901",
    "[::1]:9901",
    "localhost:9901",
    "[::ffff:127.0.0.1]:9901",
]
UPSTREAM = "upstream:\n  url: http://127.0.0.1:8000\n"


def policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("listen", OUTSIDE)
def test_a_non_loopback_admin_without_a_token_is_a_config_error(listen: str) -> None:
    text = f"version: 1\nadmin:\n  listen: {listen!r}\n  token: ${{ADMIN_TOKEN:-}}\n{UPSTREAM}"
    with pytest.raises(ConfigError) as caught:
        load_text(text, "policy.yaml", environ={})
    (problem,) = caught.value.problems
    assert problem.path == "admin.token"
    assert problem.line == 4
    assert "without a token" in problem.message
    assert "set admin.token" in problem.message
    assert "127.0.0.1" in problem.message


@pytest.mark.parametrize("listen", OUTSIDE)
def test_a_non_loopback_admin_with_a_token_is_accepted(listen: str) -> None:
    text = f"admin:\n  listen: {listen!r}\n  token: ${{ADMIN_TOKEN:-}}\n{UPSTREAM}"
    config = load_text(text, environ={"ADMIN_TOKEN": "a-secret"})
    assert config.admin_token == "a-secret"


@pytest.mark.parametrize("listen", LOOPBACK)
def test_a_loopback_admin_needs_no_token(listen: str) -> None:
    config = load_text(f"admin: {{listen: {listen!r}}}\n{UPSTREAM}", environ={})
    assert config.admin_token == ""
    assert is_loopback(config.admin_listen[0])


def test_the_admin_flag_is_named_when_it_sets_a_non_loopback_address() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(UPSTREAM, "policy.yaml", Overrides(admin="0.0.0.0:9901"), {})
    (problem,) = caught.value.problems
    assert problem.path == "--admin"
    assert problem.line is None
    # The flag wins over the file in both directions.
    text = f"admin: {{listen: '0.0.0.0:9901'}}\n{UPSTREAM}"
    config = load_text(text, flags=Overrides(admin="127.0.0.1:9901"), environ={})
    assert config.admin_listen == ("127.0.0.1", 9901)


def test_check_refuses_a_non_loopback_admin_without_a_token(tmp_path: Path) -> None:
    path = policy(tmp_path, f"version: 1\nadmin:\n  listen: 0.0.0.0:9901\n{UPSTREAM}")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    # The token is not written, so the line is the admin block's.
    assert result.stderr.startswith(f"{path}:2: admin.token: ")
    assert "Traceback" not in result.stderr


def test_check_accepts_a_non_loopback_admin_with_a_token(tmp_path: Path) -> None:
    text = f"admin:\n  listen: 0.0.0.0:9901\n  token: ${{IDEMPROXY_ADMIN_TOKEN}}\n{UPSTREAM}"
    result = run_cli("check", "-c", str(policy(tmp_path, text)), env={"IDEMPROXY_ADMIN_TOKEN": "s"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")


@pytest.mark.parametrize("listen", ["127.0.0.2:9901", "[::1]:9901", "localhost:9901"])
def test_check_accepts_a_loopback_admin_without_a_token(tmp_path: Path, listen: str) -> None:
    result = run_cli("check", "-c", str(policy(tmp_path, f"admin: {{listen: {listen!r}}}\n")))
    assert result.returncode == 0, result.stderr


def test_run_refuses_a_non_loopback_admin_from_the_file(tmp_path: Path) -> None:
    path = policy(tmp_path, "admin:\n  listen: 0.0.0.0:0\n")
    result = run_cli("run", "-c", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert f"{path}:1: admin.token: " in result.stderr
    assert "no upstream" not in result.stderr  # refused as a config error, before anything else
    assert "Traceback" not in result.stderr


def test_run_refuses_a_non_loopback_admin_from_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDEMPROXY_CONFIG", raising=False)
    result = run_cli("run", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0")
    assert result.returncode == 1
    assert result.stderr.startswith("config: --admin: the admin listener would listen on 0.0.0.0")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("::ffff:10.0.0.1", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
