"""Bearer-token auth, the loopback-only default, and secrets kept out of sight."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_helpers import (
    SUPERVISOR,
    Node,
    command_line,
    database,
    descendants,
    free_port,
    node_environ,
    running_node,
)

from orch8.api.security import check_bind, is_loopback
from orch8.errors import ConfigError

TOKEN = "tok-3f9a1c77d2e84b6b"
DB_PASSWORD = "db-secret-5e1f"
PROTECTED = [("GET", "/sequences"), ("GET", "/instances"), ("GET", "/queue"),
             ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/cluster/nodes"),
             ("POST", "/instances"), ("POST", "/cluster/nodes/x/drain"), ("GET", "/nowhere")]


@pytest.fixture(scope="module")
def secured(server_dsn: str, template_name: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with a token, on the wildcard address (allowed: it has a token), whose
    database URL carries a password (the test server trusts local connections)."""
    with database(server_dsn, template_name) as dsn, running_node(
            f"{dsn} password={DB_PASSWORD}", tmp_path_factory.mktemp("secured"),
            token=TOKEN, host="0.0.0.0") as node:
        yield node


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_token_required(secured: Node, method: str, path: str) -> None:
    node = secured
    for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        response = httpx.request(method, node.url + path, headers=headers, timeout=10)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"error": "unauthorized",
                                   "detail": "missing or wrong bearer token"}
        assert response.headers["www-authenticate"].startswith("Bearer")
    with node.client() as client:
        assert client.request(method, path).status_code != 401


def test_health_needs_no_token(secured: Node) -> None:
    assert httpx.get(secured.url + "/health/live").status_code == 200
    assert httpx.get(secured.url + "/health/ready").status_code == 200


def test_secrets_stay_hidden(secured: Node) -> None:
    with secured.client() as client:
        shown = [client.get("/cluster/nodes").text, client.get("/metrics").text,
                 client.get("/nowhere").text, client.post("/instances", json={}).text]
    shown.append(secured.output())
    processes = [secured.process.pid, *descendants(secured.process.pid)]
    assert any(command_line(pid).startswith("orch8 worker") for pid in processes)
    shown += [command_line(pid) for pid in processes]
    for text in shown:
        assert TOKEN not in text and DB_PASSWORD not in text


def test_no_token_means_open_on_loopback(server_dsn: str, template_name: str,
                                         tmp_path: Path) -> None:
    with database(server_dsn, template_name) as dsn, running_node(dsn, tmp_path) as node:
        assert httpx.get(node.url + "/queue").json()["due"] == 0
        assert httpx.get(node.url + "/sequences").status_code == 200


def test_public_bind_without_token_is_refused(dsn: str, tmp_path: Path) -> None:
    environ = node_environ(dsn, free_port(), "exposed", ORCH8_BIND=f"0.0.0.0:{free_port()}")
    refused = subprocess.run([SUPERVISOR], env=environ, capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert refused.returncode == 2
    assert "ORCH8_API_TOKEN" in refused.stderr and "--insecure" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_blank_token_is_refused_at_start(dsn: str, tmp_path: Path) -> None:
    # Whitespace would count as a token (no loopback-only rule) that no client can send.
    environ = node_environ(dsn, free_port(), "blank", ORCH8_BIND=f"0.0.0.0:{free_port()}",
                           ORCH8_API_TOKEN="  ")
    refused = subprocess.run([SUPERVISOR], env=environ, capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "orch8-supervisor: ORCH8_API_TOKEN: must not be blank or begin or end with whitespace"]


def test_insecure_flag_allows_it_loudly(dsn: str, tmp_path: Path) -> None:
    with running_node(dsn, tmp_path, host="0.0.0.0", ORCH8_INSECURE="true") as node:
        assert httpx.get(node.url + "/queue").status_code == 200
        assert "INSECURE" in node.output()


@pytest.mark.parametrize(("bind", "local"), [
    ("127.0.0.1:8080", True), ("127.5.0.1:80", True), ("[::1]:8080", True),
    ("localhost:8080", True), ("unix:/run/orch8.sock", True), ("0.0.0.0:8080", False),
    ("[::]:8080", False), ("10.0.0.5:8080", False), ("example.com:80", False),
])
def test_check_bind(bind: str, local: bool) -> None:
    assert is_loopback(bind) is local
    check_bind(bind, "a-token", insecure=False)
    check_bind(bind, None, insecure=True)
    if local:
        check_bind(bind, None, insecure=False)
    else:
        with pytest.raises(ConfigError, match="--insecure"):
            check_bind(bind, None, insecure=False)
