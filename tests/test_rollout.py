"""`orch8 rollout` against real supervisors, restarted by a real command.

The restart command is `node_service.py restart`, which does what `systemctl restart`
does: SIGTERM to the running supervisor, wait for it to exit, start a new one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from api_helpers import CLI, clean_environ
from handlers_for_tests import EXECUTIONS_TABLE
from node_service import running_pid
from supervisor_process import FAST, REPO_DIR, TESTS_DIR, Cluster, Node, free_port, wait_until
from test_supervisor import AUDIT, ONE_AT_A_TIME, assert_each_completed_once, query

from orch8 import Client

SERVICE = f"{sys.executable} {TESTS_DIR / 'node_service.py'}"
NODES = ("node-1", "node-2", "node-3")


@pytest.fixture
def db(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXECUTIONS_TABLE)
        conn.execute(AUDIT)
    return dsn


def rollout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "rollout", *args], env=clean_environ(), capture_output=True,
                          text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("orch8: ") and "Traceback" not in result.stderr, result.stderr
    return last


def ready(port: int, http: httpx.Client | None = None) -> bool:
    url = f"http://127.0.0.1:{port}/health/ready"
    try:
        answer = http.get(url) if http else httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def incarnations(dsn: str) -> dict[str, uuid.UUID]:
    return dict(query(dsn, "SELECT id, incarnation FROM cluster_nodes"))  # type: ignore[arg-type]


# --- three nodes under load, restarted as systemd would ----------------------------------


class Services:
    """Nodes started and restarted through node_service.py, as a service manager would."""

    def __init__(self, dsn: str, state_dir: Path) -> None:
        self.dsn, self.state_dir = dsn, state_dir
        self.ports: dict[str, int] = {}

    def start(self, node: str) -> None:
        port = self.ports[node] = free_port()
        environ = clean_environ(**FAST) | {
            "DATABASE_URL": self.dsn, "ORCH8_NODE_ID": node, "ORCH8_BIND": f"127.0.0.1:{port}",
            "ORCH8_WORKERS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO_DIR)])}
        (self.state_dir / f"{node}.json").write_text(json.dumps(environ))
        subprocess.run([*SERVICE.split(), "start", str(self.state_dir), node], check=True,
                       capture_output=True, timeout=30)

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def log(self, node: str) -> str:
        return (self.state_dir / f"{node}.log").read_text(errors="replace")

    def close(self) -> None:
        for node in self.ports:
            pid = running_pid(self.state_dir, node)
            if pid is not None:
                os.killpg(pid, 9)


@pytest.fixture
def services(db: str, tmp_path: Path) -> Iterator[Services]:
    started = Services(db, tmp_path)
    try:
        yield started
    finally:
        started.close()


class Load:
    """Starts three instances every 0.1 s until stopped; remembers their ids."""

    def __init__(self, dsn: str) -> None:
        self.dsn, self.ids = dsn, list[uuid.UUID]()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.dsn) as client:
            client.create_sequence("work", [{"id": "only", "handler": "record",
                                             "params": {"ms": 100}}])
            while not self.stop.wait(0.1):
                created = client.start_many([{"sequence": "work", "input": {}}] * 3)
                self.ids.extend(c.id for c in created)


class Sampler:
    """How many nodes answer 200 on /health/ready, sampled every 20 ms until stopped."""

    def __init__(self, ports: list[int]) -> None:
        self.ports, self.samples = ports, list[int]()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2) as http:  # one client: a new one per probe is slow
            while not self.stop.wait(0.02):
                self.samples.append(sum(ready(port, http) for port in self.ports))


def test_rollout_restarts_every_node_under_load(services: Services, db: str) -> None:
    for node in NODES:
        services.start(node)
    for node in NODES:
        wait_until(lambda n=node: ready(services.ports[n]), 60, f"{node} to be ready")
    before = incarnations(db)
    load, sampler = Load(db), Sampler(list(services.ports.values()))
    load.thread.start()
    sampler.thread.start()
    wait_until(lambda: query(db, "SELECT EXISTS (SELECT 1 FROM test_executions)")[0][0], 30,
               "the load to run")
    try:
        result = rollout(*(f"{node}={services.url(node)}" for node in NODES), "--json",
                         "--restart", f"{SERVICE} restart {services.state_dir} {{node}}")
    finally:
        load.stop.set()
        sampler.stop.set()
        load.thread.join()
        sampler.thread.join()
    assert result.returncode == 0, (result.stderr, *(services.log(n) for n in NODES))
    summary = json.loads(result.stdout)
    assert summary["completed"] == 3 and summary["error"] is None
    assert [done["node"] for done in summary["restarted"]] == list(NODES)
    assert all(d["started_at_after"] != d["started_at_before"] for d in summary["restarted"])
    assert "node-2: draining" in result.stderr and "node-3: ready again" in result.stderr
    phases = [(d["node"], d["drained_s"], d["restarted_s"], d["ready_s"])
              for d in summary["restarted"]]
    print(f"\nready nodes per sample: min {min(sampler.samples)}, "
          f"{len(sampler.samples)} samples; {len(load.ids)} instances started during the "
          f"run; (node, drained s, restart s, ready s): {phases}")
    assert min(sampler.samples) >= 1, "at some moment no node was ready"
    after = incarnations(db)
    assert set(after) == set(NODES)
    assert all(after[node] != before[node] for node in NODES), "each is a new incarnation"
    wait_until(lambda: query(db, "SELECT NOT EXISTS (SELECT 1 FROM instances "
                                 "WHERE state <> 'completed')")[0][0], 60,
               "every instance to complete")
    assert_each_completed_once(db, load.ids)  # 0 lost, 0 recorded twice


# --- refusals ----------------------------------------------------------------------------


@pytest.fixture
def cluster(db: str, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(db, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def drain_requested(dsn: str, node_id: str) -> bool:
    rows = query(dsn, "SELECT drain_requested_at IS NOT NULL FROM cluster_nodes "
                      "WHERE id = %(id)s", {"id": node_id})
    return bool(rows[0][0])


def target(node: Node) -> str:
    return f"{node.node_id}={node.url('')}"


def marker_command(tmp_path: Path) -> str:
    """A restart command that only leaves a file behind, so a test sees whether it ran."""
    return f"touch {tmp_path}/restarted-{{node}}"


def test_refuses_when_too_few_other_nodes_are_ready(cluster: Cluster, db: str,
                                                   tmp_path: Path) -> None:
    node = cluster.start("node-a")
    error = one_line_error(rollout(target(node), "--restart", marker_command(tmp_path)))
    assert error == ("orch8: refusing to drain node-a: 0 other node(s) ready (none), "
                     "--min-ready is 1")
    assert node.ready_status() == 200 and not drain_requested(db, "node-a")
    assert not list(tmp_path.glob("restarted-*"))


def test_stops_when_a_node_never_drains(cluster: Cluster, db: str, tmp_path: Path) -> None:
    node = cluster.start("node-a", **ONE_AT_A_TIME)
    with Client(db) as client:
        client.create_sequence("slow", [{"id": "only", "handler": "record",
                                         "params": {"ms": 120_000}}])
        client.start("slow")
    wait_until(lambda: query(db, "SELECT EXISTS (SELECT 1 FROM test_executions)")[0][0], 20,
               "a step in flight")
    result = rollout(target(node), "--min-ready", "0", "--drain-timeout", "2",
                     "--restart", marker_command(tmp_path))
    error = one_line_error(result)
    assert error.startswith("orch8: node node-a has not left after 2s (draining, "
                            "1 instances claimed)"), error
    assert "node-a: draining" in result.stderr
    assert not list(tmp_path.glob("restarted-*")), "no restart while it still drains"
    assert node.process.poll() is None and node.ready_status() == 503


def test_stops_at_a_failing_restart_command(cluster: Cluster, db: str, tmp_path: Path) -> None:
    a, b = cluster.start("node-a"), cluster.start("node-b")
    result = rollout(target(a), target(b), "--json", "--restart", "echo {node}; exit 3")
    error = one_line_error(result)
    assert error == ("orch8: restart command for node-a failed with exit code 3: "
                     "echo node-a; exit 3; stopping the rollout")
    assert "node-a\n" in result.stderr, "the command's output goes to stderr"
    summary = json.loads(result.stdout)
    assert summary == {"restarted": [], "completed": 0, "of": 2, "error": error[7:]}
    assert a.wait_exit(30) == 0, "node-a was drained"
    assert b.ready_status() == 200 and not drain_requested(db, "node-b"), "node-b untouched"


def test_dry_run_changes_nothing(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a")
    missing = f"node-x=http://127.0.0.1:{free_port()}"
    result = rollout(target(node), missing, "--dry-run", "--json",
                     "--restart", "ssh {host} sudo systemctl restart 'orch8@{node}'")
    assert result.returncode == 0, result.stderr
    plan: dict[str, Any] = json.loads(result.stdout)
    assert plan["dry_run"] is True
    assert [(n["node"], n["ready"]) for n in plan["nodes"]] == [("node-a", True),
                                                                 ("node-x", False)]
    assert plan["nodes"][0]["command"] == "ssh 127.0.0.1 sudo systemctl restart 'orch8@node-a'"
    assert node.ready_status() == 200 and not drain_requested(db, "node-a")


@pytest.mark.parametrize(("args", "expected"), [
    (("node-a", "--restart", "true"), "'node-a' is not NODE=URL"),
    (("node-a=ftp://x", "--restart", "true"), "'ftp://x' is not an http(s) URL"),
    (("a=http://x", "--restart", "restart {nod}"), "unknown placeholder {nod}"),
    (("a=http://x", "a=http://y", "--restart", "true"), "node a is listed twice"),
    (("a=http://x",), "the following arguments are required: --restart"),
])
def test_usage_errors_exit_2(args: tuple[str, ...], expected: str) -> None:
    result = rollout(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch8: ") and expected in lines[0], lines


def test_a_missing_token_stops_before_anything_is_drained(cluster: Cluster, db: str,
                                                          tmp_path: Path) -> None:
    node = cluster.start("node-a", ORCH8_API_TOKEN="rollout-token-5c1f")
    error = one_line_error(rollout(target(node), "--min-ready", "0",
                                   "--restart", marker_command(tmp_path)))
    assert "(set ORCH8_API_TOKEN to the node's token)" in error, error
    assert node.ready_status() == 200 and not drain_requested(db, "node-a")
    assert not list(tmp_path.glob("restarted-*"))
