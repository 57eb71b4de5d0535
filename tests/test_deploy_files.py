"""The deployment files, checked offline: systemd units with `systemd-analyze verify`,
Kubernetes manifests against the Kubernetes schemas (kubernetes-validate), compose.yaml
against the Compose specification (the schema check-jsonschema vendors), and every path,
port, variable, probe and metric they name against the project itself.

No container runtime or cluster runs here: nothing in this file builds or starts an image.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from orch8.api import cluster
from orch8.config import FIELDS, Settings
from supervisor.arbiter import DRAIN_GRACE_S, TICK_S

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes release the manifests must suit (autoscaling/v2, policy/v1).
KUBERNETES_VERSION = "1.27.0"
SETTINGS = {variable for variable, _, _ in FIELDS}
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# Shortest drain-and-leave a stop timeout must cover: the drain timeout, then the grace
# before the supervisor kills what is left.
STOP_NEEDS_S = Settings().drain_timeout_s + DRAIN_GRACE_S


def routes() -> set[str]:
    return {route.path for route in cluster.routes(None)}  # type: ignore[arg-type,attr-defined]


def settings_named(text: str) -> set[str]:
    return set(re.findall(r"\bORCH8_[A-Z_]+\b", text)) - {"ORCH8_URL"}


# --- systemd -----------------------------------------------------------------------------


def unit(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


UNITS = ("orch8.service", "orch8@.service")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
@pytest.mark.parametrize("name", UNITS)
def test_units_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    # verify insists the executable exists: point ExecStart at this checkout's script.
    script = Path(sys.executable).with_name("orch8-supervisor")
    text = (REPO / "systemd" / name).read_text()
    assert "/opt/orch8/.venv/bin/orch8-supervisor" in text
    copy = tmp_path / name.replace("@.", "@node-1.")
    copy.write_text(text.replace("/opt/orch8/.venv/bin/orch8-supervisor", str(script)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even for a line it ignores; any complaint at all fails the test.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result


@pytest.mark.parametrize("name", UNITS)
def test_units_match_the_supervisor(name: str) -> None:
    values = unit(name)
    assert values["Type"] == ["notify"] and values["KillSignal"] == ["SIGTERM"]
    assert values["ExecStart"][0].split()[0].rsplit("/", 1)[1] in SCRIPTS
    assert float(values["TimeoutStopSec"][0]) > STOP_NEEDS_S
    # Pings come from the main loop every WatchdogSec/2; it must fit many ticks.
    assert float(values["WatchdogSec"][0]) / 2 > 10 * TICK_S
    assert values["RestartPreventExitStatus"] == ["2 3"]
    assert settings_named((REPO / "systemd" / name).read_text()) <= SETTINGS


def test_template_gives_each_instance_its_own_node_id_and_address() -> None:
    values = unit("orch8@.service")
    assert "--node-id %i" in values["ExecStart"][0]
    assert "/etc/orch8/%i.env" in values["EnvironmentFile"], "per-instance ORCH8_BIND"
    assert any("%i" in value for value in values["Environment"] if "ORCH8_DATA_DIR" in value)


# --- container image ---------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile() -> None:
    lines = dockerfile()
    bases = [args for op, args in lines if op == "FROM"]
    assert all(re.match(r"python:3\.1[1-9]-slim", base) for base in bases), bases
    for op, args in lines:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), source
    [user] = [args for op, args in lines if op == "USER"]
    uid, gid = user.split(":")
    assert int(uid) >= 1000, "non-root, numeric (runAsNonRoot can check it)"
    assert any(op == "RUN" and f"--uid {uid} --gid {gid}" in args and f"--gid {gid} orch8"
               in args for op, args in lines), "the user and group the image runs as exist"
    assert ("STOPSIGNAL", "SIGTERM") in lines
    [entrypoint] = [args for op, args in lines if op == "ENTRYPOINT"]
    assert entrypoint.startswith('["/usr/bin/tini", "--"]')
    assert any(op == "RUN" and "install" in args and " tini" in args for op, args in lines)
    [command] = [args for op, args in lines if op == "CMD"]
    assert yaml.safe_load(command)[0] in SCRIPTS
    [env] = [args for op, args in lines if op == "ENV"]
    port = re.search(r"ORCH8_BIND=0\.0\.0\.0:(\d+)", env)[1]  # type: ignore[index]
    assert ("EXPOSE", port) in lines
    [health] = [args for op, args in lines if op == "HEALTHCHECK"]
    assert json.loads(health.split(" CMD ", 1)[1])[0] == "python", "exec form, no shell"
    probe = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", health)
    assert probe and probe[1] == port and probe[2] == "/health/live"
    assert "/health/live" in routes()
    assert settings_named((REPO / "Dockerfile").read_text()) <= SETTINGS


# --- Compose -----------------------------------------------------------------------------


def compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    checker = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    result = compose_check(REPO / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((REPO / "compose.yaml").read_text().replace(
        "stop_grace_period: 330s", "stop_grace_period: [330]"))
    assert compose_check(broken).returncode != 0, "the schema check can fail"


def test_compose_file_matches_the_project() -> None:
    text = (REPO / "compose.yaml").read_text()
    services: dict[str, Any] = yaml.safe_load(text)["services"]
    nodes = {name: service for name, service in services.items() if name.startswith("node-")}
    assert len(nodes) == 3
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    [port] = {binding.rsplit(":", 1)[1] for node in nodes.values() for binding in node["ports"]}
    assert f"ORCH8_BIND=0.0.0.0:{port}" in (REPO / "Dockerfile").read_text()
    for name, node in nodes.items():
        assert node["environment"]["ORCH8_NODE_ID"] == name
        assert node["depends_on"] == {"postgres": {"condition": "service_healthy"}}
        drain = float(node["environment"]["ORCH8_DRAIN_TIMEOUT_SECS"])
        assert float(node["stop_grace_period"].rstrip("s")) > drain + DRAIN_GRACE_S
        assert set(node["environment"]) <= SETTINGS
        assert "ORCH8_API_TOKEN" not in node["environment"], "the token is not inline"
        assert node["env_file"] == "deploy/orch8.env"
        assert node["build"] == "." and (REPO / "Dockerfile").exists()
    example = (REPO / "deploy" / "orch8.env.example").read_text()
    assert {"DATABASE_URL", "ORCH8_API_TOKEN", "POSTGRES_PASSWORD"} <= set(
        re.findall(r"^([A-Z_0-9]+)=", example, re.MULTILINE))
    assert "deploy/orch8.env" in (REPO / ".gitignore").read_text().splitlines()
    assert settings_named(example) <= SETTINGS


# --- Kubernetes --------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_follows_the_kubernetes_schema(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_a_wrong_manifest_is_refused() -> None:
    deployment = manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 330
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_deployment_matches_the_project() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert set(env) - {"DATABASE_URL"} <= SETTINGS
    for secret in ("DATABASE_URL", "ORCH8_API_TOKEN"):
        assert env[secret]["valueFrom"]["secretKeyRef"]["name"] == "orch8"
    drain = float(env["ORCH8_DRAIN_TIMEOUT_SECS"]["value"])
    assert pod["terminationGracePeriodSeconds"] > drain + DRAIN_GRACE_S
    assert "lifecycle" not in container, "SIGTERM is the drain; no preStop hook"
    [port] = container["ports"]
    assert env["ORCH8_BIND"]["value"] == f"0.0.0.0:{port['containerPort']}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
        assert container[probe]["httpGet"]["path"] in routes()
    user = [args for op, args in dockerfile() if op == "USER"][0].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_service_budget_and_autoscaler_point_at_the_deployment() -> None:
    found = manifests()
    labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert found["Service"]["spec"]["selector"] == labels
    assert found["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    target = found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", found["Deployment"]["metadata"]
                                                ["name"])
    [metric] = found["HorizontalPodAutoscaler"]["spec"]["metrics"]
    name = metric["external"]["metric"]["name"]
    assert f'"{name}"' in (REPO / "orch8" / "api" / "metrics.py").read_text(), "a metric we export"
    adapter = yaml.safe_load((KUBERNETES / "metrics-adapter" / "values.yaml").read_text())
    [rule] = adapter["rules"]["external"]
    assert rule["name"]["as"] == name and name in rule["seriesQuery"]
