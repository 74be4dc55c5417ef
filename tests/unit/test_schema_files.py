"""Every policy the project ships or shows validates against the JSON Schema.

The policies: ``config/*.yaml``, the image's ``deploy/policy.yaml``, the policy embedded in
``deploy/kubernetes/configmap.yaml`` and every policy example in README.md. Each is checked the
way an editor sees it - by the real ``check-jsonschema`` CLI, which reads YAML 1.2 (``off`` is a
string there) - and the way the loader sees it (YAML 1.1, ``off`` is false), and the loader
accepts it too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from idemproxy.config import load_text
from idemproxy.schema import SCHEMA_FILE, policy_schema

ROOT = Path(__file__).resolve().parents[2]
# The environment a policy needs to load: the Kubernetes one has no defaults on purpose.
ENVIRON = {"IDEMPROXY_STORE_URL": "redis://redis:6379/0", "IDEMPROXY_ADMIN_TOKEN": "t0ken"}


def readme_policies() -> dict[str, str]:
    """The README's ```yaml blocks, each a policy or a part of one (not a Compose file or a
    Kubernetes object), by the line they start on. A block of comments only is no example."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = {}
    for match in re.finditer(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        document = yaml.safe_load(match.group(1))
        if isinstance(document, dict) and not {"services", "apiVersion"} & set(document):
            blocks[f"README.md:{text.count(chr(10), 0, match.start()) + 2}"] = match.group(1)
    return blocks


def shipped_policies() -> dict[str, str]:
    policies = {
        path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in [*sorted((ROOT / "config").glob("*.yaml")), ROOT / "deploy" / "policy.yaml"]
    }
    configmap = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    policies["deploy/kubernetes/configmap.yaml"] = configmap["data"]["policy.yaml"]
    return {**policies, **readme_policies()}


POLICIES = shipped_policies()


def test_the_policies_are_found() -> None:
    assert len([name for name in POLICIES if name.startswith("config/")]) >= 4, list(POLICIES)
    assert {"deploy/policy.yaml", "deploy/kubernetes/configmap.yaml"} <= set(POLICIES)
    assert len(readme_policies()) >= 2, "the policy file section shows a policy and limits"


def test_check_jsonschema_accepts_every_policy(tmp_path: Path) -> None:
    files = []
    for name, text in POLICIES.items():
        path = tmp_path / (re.sub(r"[^\w.-]", "_", name) + ".yaml")
        path.write_text(text, encoding="utf-8")
        files.append(path)
    result = check_jsonschema(SCHEMA_FILE, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def check_jsonschema(schema: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_jsonschema_reads_yaml_1_2(tmp_path: Path) -> None:
    """The CLI sees a bare ``off`` as a string, as editors do: the test above covers them."""
    schema = tmp_path / "schema.json"
    schema.write_text('{"properties": {"v": {"type": "string"}}}', encoding="utf-8")
    (tmp_path / "off.yaml").write_text("v: off\n", encoding="utf-8")
    (tmp_path / "false.yaml").write_text("v: false\n", encoding="utf-8")
    assert check_jsonschema(schema, tmp_path / "off.yaml").returncode == 0
    assert check_jsonschema(schema, tmp_path / "false.yaml").returncode == 1


def test_check_jsonschema_rejects_a_misspelling(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("routes:\n  - match: {path: /a}\n    idempotency: of\n", encoding="utf-8")
    result = check_jsonschema(SCHEMA_FILE, path)
    assert result.returncode == 1, result.stdout
    assert "$.routes[0].idempotency" in result.stdout


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_validates_as_the_loader_reads_it(name: str) -> None:
    document = yaml.safe_load(POLICIES[name])
    jsonschema.Draft202012Validator(policy_schema()).validate(document)
    load_text(POLICIES[name], name, None, ENVIRON)
