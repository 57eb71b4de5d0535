"""The `orch8` command line, run as a subprocess against a running node."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import CLI, Node, clean_environ, database, free_port, running_node

TOKEN = "cli-test-token-7d1e"


@pytest.fixture(scope="module")
def node(server_dsn: str, template_name: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with database(server_dsn, template_name) as dsn, running_node(
            dsn, tmp_path_factory.mktemp("cli"), token=TOKEN) as node:
        yield node


def orch8(node: Node | None, *args: str, token: str | None = TOKEN,
          **environ: str) -> subprocess.CompletedProcess[str]:
    """Run `orch8 ARGS` with ORCH8_URL and ORCH8_API_TOKEN pointing at `node`."""
    settings = ({"ORCH8_URL": node.url} if node else {}) | ({"ORCH8_API_TOKEN": token}
                                                            if token else {})
    return subprocess.run([CLI, *args], env=clean_environ(**(settings | environ)),
                          capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch8: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def sequences(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Path:
    file = tmp_path_factory.mktemp("defs") / "sequences.json"
    file.write_text(json.dumps([
        {"name": "greet", "steps": [
            {"id": "hello", "handler": "noop", "params": {"who": "world"}},
            {"id": "say", "handler": "log", "params": {"message": "hi {{ input.name }}"}}]},
        {"name": "doomed", "steps": [
            {"id": "boom", "handler": "fail", "params": {"retryable": False}}]},
    ]))
    applied = orch8(node, "sequences", "apply", str(file))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines()[0].split() == ["NAME", "VERSION", "STEPS", "CREATED_AT"]
    assert "greet" in applied.stdout and "doomed" in applied.stdout
    return file


def test_usage_errors_exit_2(node: Node, tmp_path: Path) -> None:
    assert orch8(None, "--help").returncode == 0
    assert "a command is required" in one_line_error(orch8(None), 2)
    one_line_error(orch8(node, "frobnicate"), 2)
    one_line_error(orch8(node, "run"), 2)
    assert "--input" in one_line_error(orch8(node, "run", "greet", "--input", "{"), 2)
    one_line_error(orch8(node, "run", "greet", "--input", "[1]"), 2)
    one_line_error(orch8(node, "instances", "list", "--limit", "0"), 2)
    one_line_error(orch8(node, "instances", "list", "--state", "asleep"), 2)
    assert "cannot read" in one_line_error(
        orch8(node, "sequences", "apply", str(tmp_path / "missing.json")), 2)
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    assert "not valid JSON" in one_line_error(orch8(node, "sequences", "apply", str(broken)), 2)
    # An address that cannot be one is the command line's mistake; '' is not "unset".
    for url in ("notaurl", "", "ftp://host/"):
        line = one_line_error(orch8(node, "queue", "--url", url), 2)
        assert "--url: must be an http:// or https:// address" in line and "Error" not in line


def test_failures_exit_1_in_one_line(node: Node) -> None:
    down = orch8(None, "queue", ORCH8_URL=f"http://127.0.0.1:{free_port()}")
    assert "cannot reach" in one_line_error(down, 1)
    wrong = orch8(node, "queue", token="not-the-token")
    line = one_line_error(wrong, 1)
    assert "HTTP 401" in line and "ORCH8_API_TOKEN" in line and "not-the-token" not in line
    assert "HTTP 401" in one_line_error(orch8(node, "queue", token=None), 1)
    assert "HTTP 404" in one_line_error(orch8(node, "instances", "get", "nonsense"), 1)
    assert "no sequence nope" in one_line_error(orch8(node, "run", "nope"), 1)
    line = one_line_error(orch8(None, "queue", ORCH8_URL="notaurl"), 1)
    assert "must be an http:// or https:// URL" in line and "Error" not in line


def test_migrate_without_a_database_is_one_line() -> None:
    unreachable = f"postgresql://orch8@127.0.0.1:{free_port()}/nothing?connect_timeout=2"
    line = one_line_error(orch8(None, "migrate", token=None, DATABASE_URL=unreachable), 1)
    assert line.startswith("orch8: cannot migrate the database: ") and "Error" not in line


def test_sequences_list_and_get(node: Node, sequences: Path) -> None:
    listed = orch8(node, "sequences", "list")
    assert listed.returncode == 0
    rows = {line.split()[0]: line.split()[1:3] for line in listed.stdout.splitlines()[1:]}
    assert rows["greet"] == ["1", "2"] and rows["doomed"] == ["1", "1"]
    as_json = json.loads(orch8(node, "sequences", "list", "--json").stdout)
    assert {item["name"] for item in as_json} >= {"greet", "doomed"}
    shown = orch8(node, "sequences", "get", "greet")
    assert shown.returncode == 0 and "greet version 1" in shown.stdout and "noop" in shown.stdout


def test_run_and_wait(node: Node, sequences: Path) -> None:
    done = orch8(node, "run", "greet", "--input", '{"name": "Ada"}', "--wait", "--json")
    assert done.returncode == 0, done.stderr
    instance = json.loads(done.stdout)
    assert instance["state"] == "completed"
    assert instance["outputs"]["say"] == {"message": "hi Ada"}
    assert "completed" in done.stderr.splitlines()[-1]  # progress went to stderr
    failed = orch8(node, "run", "doomed", "--wait")
    assert failed.returncode == 1
    assert "state" in failed.stdout and "failed" in failed.stdout


def test_instances_commands(node: Node, sequences: Path) -> None:
    started = orch8(node, "run", "doomed")
    assert started.returncode == 0
    instance_id = started.stdout.strip()
    got = json.loads(orch8(node, "instances", "get", instance_id, "--json").stdout)
    assert got["id"] == instance_id and got["sequence"] == "doomed"
    orch8(node, "run", "doomed", "--wait")  # something surely failed by now
    failed = json.loads(orch8(node, "instances", "list", "--state", "failed", "--json").stdout)
    assert failed["instances"] and {item["state"] for item in failed["instances"]} == {"failed"}
    victim = failed["instances"][0]["id"]
    retried = orch8(node, "instances", "retry", victim)
    assert retried.returncode == 0 and retried.stdout.split() == [victim, "scheduled"]
    table = orch8(node, "instances", "list", "--sequence", "doomed", "--limit", "1")
    assert table.returncode == 0 and "(more: --before" in table.stdout
    assert table.stdout.splitlines()[0].split()[:4] == ["ID", "SEQUENCE", "VERSION", "STATE"]


def test_cancel(node: Node, sequences: Path) -> None:
    later = orch8(node, "run", "greet", "--delay-ms", "3600000")
    assert later.returncode == 0
    instance_id = later.stdout.strip()
    cancelled = orch8(node, "instances", "cancel", instance_id)
    assert cancelled.returncode == 0 and cancelled.stdout.split() == [instance_id, "cancelled"]
    line = one_line_error(orch8(node, "instances", "cancel", instance_id), 1)
    assert line == "orch8: cannot cancel an instance that is cancelled (HTTP 409)"


def test_queue_and_nodes(node: Node) -> None:
    queue = orch8(node, "queue")
    assert queue.returncode == 0
    assert [line.split()[0] for line in queue.stdout.splitlines()] == [
        "PRIORITY", "low", "normal", "high", "critical", "total"]
    assert json.loads(orch8(node, "queue", "--json").stdout)["due"] >= 0
    nodes = orch8(node, "nodes")
    assert nodes.returncode == 0 and node.node_id in nodes.stdout and "active" in nodes.stdout
    listed = json.loads(orch8(node, "nodes", "--json").stdout)
    assert [item["id"] for item in listed] == [node.node_id]


def test_rate_limits(node: Node) -> None:
    stored = orch8(node, "rate-limits", "set", "email", "--max", "5", "--window-ms", "1000")
    assert stored.returncode == 0, stored.stderr
    listed = json.loads(orch8(node, "rate-limits", "list", "--json").stdout)
    assert [(item["handler"], item["max"], item["window_ms"]) for item in listed] == [
        ("email", 5, 1000)]
    assert orch8(node, "rate-limits", "delete", "email").returncode == 0
    assert "no rate limit" in one_line_error(orch8(node, "rate-limits", "delete", "email"), 1)
    assert json.loads(orch8(node, "rate-limits", "list", "--json").stdout) == []


def test_migrate(dsn: str) -> None:
    result = orch8(None, "migrate", token=None, DATABASE_URL=dsn)
    assert result.returncode == 0 and result.stdout.startswith("applied 0 migration(s)")


def test_drain_and_wait(dsn: str, tmp_path: Path) -> None:
    with running_node(dsn, tmp_path) as other:
        drained = orch8(other, "drain", other.node_id, "--wait", token=None)
        assert drained.returncode == 0, drained.stderr
        assert f"node {other.node_id} has left" in drained.stdout
        assert other.process.wait(30) == 0
        missing = orch8(other, "drain", "no-such-node", token=None)
        assert missing.returncode == 1
