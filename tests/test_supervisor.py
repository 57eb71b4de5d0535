"""The supervisor as operators run it: real processes, real signals, real PostgreSQL.

Intervals are short (1 s heartbeat, 3 s stale threshold) and set through the same
environment variables an operator uses. Every claim of "nothing ran twice" is proven from
data: the `record` handler writes a row per execution, and audit triggers count each
completion and each step-output write.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from handlers_for_tests import EXECUTIONS_TABLE
from supervisor_process import Cluster, Node, free_port, wait_until, worker_pids

from orch8 import Client

AUDIT = """
CREATE TABLE test_completions (instance_id uuid NOT NULL);
CREATE TABLE test_step_writes (instance_id uuid NOT NULL, step_id text NOT NULL,
                               output jsonb NOT NULL);
CREATE FUNCTION test_audit_completion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'completed' AND OLD.state <> 'completed' THEN
        INSERT INTO test_completions VALUES (NEW.id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER test_audit_completion AFTER UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION test_audit_completion();
CREATE FUNCTION test_audit_step_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_step_writes VALUES (NEW.instance_id, NEW.step_id, NEW.output);
    RETURN NULL;
END $$;
CREATE TRIGGER test_audit_step_write AFTER INSERT OR UPDATE ON step_outputs
    FOR EACH ROW EXECUTE FUNCTION test_audit_step_write();
"""

# One step per instance, one instance in flight per worker: easy to reason about.
ONE_AT_A_TIME = {"ORCH8_MAX_IN_FLIGHT": "1", "ORCH8_BATCH_SIZE": "1"}


@pytest.fixture
def db(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXECUTIONS_TABLE)
        conn.execute(AUDIT)
    return dsn


@pytest.fixture
def cluster(db: str, tmp_path: Any) -> Iterator[Cluster]:
    nodes = Cluster(db, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def start_instances(dsn: str, count: int, ms: int, max_attempts: int = 1) -> list[uuid.UUID]:
    with Client(dsn) as client:
        client.create_sequence("work", [{"id": "only", "handler": "record",
                                         "params": {"ms": ms},
                                         "retry": {"max_attempts": max_attempts,
                                                   "initial_backoff_ms": 10}}])
        created = client.start_many([{"sequence": "work", "input": {"n": n}}
                                     for n in range(count)])
    return [c.id for c in created]


def query(dsn: str, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params or {}).fetchall()  # type: ignore[arg-type]


def states(dsn: str) -> Counter[str]:
    return Counter(dict(query(dsn, "SELECT state, count(*) FROM instances GROUP BY state")))


def all_completed(dsn: str, count: int) -> bool:
    return states(dsn)["completed"] == count


def executions(dsn: str) -> list[tuple[uuid.UUID, str, int]]:
    """(instance id, node id, pid) of every handler execution, in start order."""
    return [tuple(row) for row in query(  # type: ignore[misc]
        dsn, "SELECT instance_id, node_id, pid FROM test_executions ORDER BY started_at")]


def recorded_by(dsn: str) -> dict[uuid.UUID, str]:
    """The node whose output was recorded, per instance."""
    rows = query(dsn, "SELECT instance_id, output->>'node' FROM step_outputs")
    return dict(rows)  # type: ignore[arg-type]


def assert_each_completed_once(dsn: str, ids: list[uuid.UUID]) -> None:
    completions = Counter(row[0] for row in query(dsn, "SELECT * FROM test_completions"))
    writes = Counter(row[0] for row in query(dsn, "SELECT instance_id FROM test_step_writes"))
    assert completions == Counter(ids), "an instance completed twice or never"
    assert writes == Counter(ids), "a step outcome was written twice or never"


def node_row(dsn: str, node_id: str) -> tuple[Any, ...] | None:
    rows = query(dsn, "SELECT state, incarnation, last_heartbeat FROM cluster_nodes "
                      "WHERE id = %(id)s", {"id": node_id})
    return tuple(rows[0]) if rows else None


def in_flight_on(dsn: str, node_id: str) -> list[tuple[uuid.UUID, int]]:
    """Executions by `node_id` whose outcome is not recorded yet: (instance, pid)."""
    rows = query(dsn, """
        SELECT e.instance_id, e.pid FROM test_executions e
        WHERE e.node_id = %(node)s
          AND NOT EXISTS (SELECT 1 FROM step_outputs o WHERE o.instance_id = e.instance_id)
        """, {"node": node_id})
    return [(row[0], row[1]) for row in rows]


def test_node_with_two_workers_completes_a_batch(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a", ORCH8_MAX_IN_FLIGHT="2", ORCH8_BATCH_SIZE="2")
    ids = start_instances(db, 20, ms=50)
    wait_until(lambda: all_completed(db, 20), 30, "the batch to complete")
    assert_each_completed_once(db, ids)
    assert len({pid for _, _, pid in executions(db)}) == 2, "both workers should work"
    [listed] = node.get("/cluster/nodes").json()
    assert listed["id"] == "node-a" and listed["state"] == "active"
    assert listed["instances_claimed"] == 0 and listed["workers"] == 2
    assert listed["last_heartbeat"].endswith("Z")
    assert node.get("/health/live").status_code == 200
    assert node.get("/health/ready").text == "ok"


def command_lines_of_group(pgid: int) -> dict[int, str]:
    found = {}
    for pid in [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
        try:
            if os.getpgid(pid) == pgid:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(
                    b"\0", b" ").decode().strip()
        except (OSError, ProcessLookupError):
            continue
    return found


def test_flags_override_the_environment_and_titles_hide_the_dsn(cluster: Cluster,
                                                                db: str) -> None:
    node = cluster.start("node-a", args=("--workers", "1", "--node-id", "node-x"),
                         ORCH8_WORKERS="3")
    node.node_id = "node-x"
    [listed] = node.get("/cluster/nodes").json()
    assert (listed["id"], listed["workers"]) == ("node-x", 1)
    titles = command_lines_of_group(node.pid)
    assert titles[node.pid] == "orch8 supervisor node-x"
    assert sorted(t for t in titles.values() if "worker" in t) == ["orch8 worker 1/1 node-x"]
    assert not [t for t in titles.values() if "dbname" in t or "postgres" in t]


def test_two_supervisors_share_one_database(cluster: Cluster, db: str) -> None:
    a = cluster.start("node-a", ORCH8_MAX_IN_FLIGHT="2", ORCH8_BATCH_SIZE="2")
    cluster.start("node-b", ORCH8_MAX_IN_FLIGHT="2", ORCH8_BATCH_SIZE="2")
    ids = start_instances(db, 40, ms=100)
    wait_until(lambda: all_completed(db, 40), 60, "the batch to complete")
    ran = executions(db)
    assert len(ran) == 40, "every instance ran exactly once: no claim was shared"
    assert {node for _, node, _ in ran} == {"node-a", "node-b"}
    assert_each_completed_once(db, ids)
    assert {n["id"] for n in a.get("/cluster/nodes").json()} == {"node-a", "node-b"}


def test_killed_worker_is_released_at_once_and_restarted(cluster: Cluster, db: str) -> None:
    # A long stale threshold: anything re-run quickly was released by the supervisor.
    node = cluster.start("node-a", ORCH8_STALE_THRESHOLD_SECS="60", **ONE_AT_A_TIME)
    # The step running in the killed worker is charged an attempt: give it a second one.
    ids = start_instances(db, 4, ms=2500, max_attempts=2)
    [(victim_instance, victim_pid), *_] = wait_until(
        lambda: in_flight_on(db, "node-a"), 20, "a step in flight")
    killed_at = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    wait_until(lambda: sum(1 for i, _, _ in executions(db) if i == victim_instance) == 2,
               20, "the killed worker's instance to run again")
    assert time.monotonic() - killed_at < 15, "released by the supervisor, not by staleness"
    wait_until(lambda: all_completed(db, 4), 30, "every instance to complete")
    assert_each_completed_once(db, ids)
    log = node.log()
    assert f"(pid {victim_pid}) killed by SIGKILL" in log
    assert (f"instance {victim_instance}: worker killed by SIGKILL while running step only; "
            "retrying in") in log
    attempts = [a for i, a in query(db, "SELECT instance_id, attempt FROM test_executions")
                if i == victim_instance]
    assert sorted(attempts) == [1, 2], "the killed execution counted as the first attempt"
    wait_until(lambda: len(node.worker_pids()) == 2 and victim_pid not in node.worker_pids(),
               20, "the worker to be restarted")
    wait_until(lambda: node.ready_status() == 200, 20, "the node to be ready again")


def test_killed_node_is_reclaimed_after_the_threshold(cluster: Cluster, db: str) -> None:
    a = cluster.start("node-a", **ONE_AT_A_TIME)
    cluster.start("node-b", **ONE_AT_A_TIME)
    ids = start_instances(db, 6, ms=2000)
    wait_until(lambda: in_flight_on(db, "node-a"), 20, "node-a to run something")
    a.signal_group(signal.SIGKILL)
    a.wait_exit(10)
    wait_until(lambda: all_completed(db, 6), 60, "node-b to finish everything")
    assert_each_completed_once(db, ids)
    assert node_row(db, "node-a")[0] == "dead"  # type: ignore[index]
    assert set(recorded_by(db).values()) <= {"node-a", "node-b"}
    orphaned = {i for i, node, _ in executions(db) if node == "node-a"} - {
        i for i, node in recorded_by(db).items() if node == "node-a"}
    assert orphaned, "node-a died holding work"
    assert all(recorded_by(db)[i] == "node-b" for i in orphaned)


def test_sigterm_drains_in_flight_steps_then_deregisters(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a", **ONE_AT_A_TIME)
    start_instances(db, 6, ms=3000)
    wait_until(lambda: len(in_flight_on(db, "node-a")) == 2, 20, "two steps in flight")
    in_flight = {i for i, _ in in_flight_on(db, "node-a")}
    beat_before = node_row(db, "node-a")[2]  # type: ignore[index]
    node.signal(signal.SIGTERM)
    wait_until(lambda: node.ready_status() == 503, 1.0, "/health/ready to turn 503", 0.05)
    assert node.get("/health/live").status_code == 200
    wait_until(lambda: (row := node_row(db, "node-a")) and row[0] == "draining"
               and row[2] > beat_before, 5, "a heartbeat while draining")
    assert node.wait_exit(30) == 0, node.log()
    assert len(executions(db)) == 2, "no new claims after SIGTERM"
    assert set(recorded_by(db)) == in_flight, "the in-flight steps completed"
    assert states(db) == Counter({"completed": 2, "scheduled": 4})
    assert query(db, "SELECT count(*) FROM instances WHERE claimed_by IS NOT NULL "
                     "AND state = 'scheduled'") == [(0,)]
    assert node_row(db, "node-a") is None, "deregistered"


def test_drain_request_sent_to_another_node(cluster: Cluster, db: str) -> None:
    # A slow heartbeat: acting within the second below proves the NOTIFY reached node-a.
    # The threshold is the cluster's: every node must use the same one.
    a = cluster.start("node-a", ORCH8_HEARTBEAT_INTERVAL_SECS="10",
                      ORCH8_STALE_THRESHOLD_SECS="30", **ONE_AT_A_TIME)
    b = cluster.start("node-b", ORCH8_STALE_THRESHOLD_SECS="30", **ONE_AT_A_TIME)
    ids = start_instances(db, 6, ms=2000)
    wait_until(lambda: in_flight_on(db, "node-a"), 20, "node-a to run something")
    response = b.post("/cluster/nodes/node-a/drain")
    assert response.status_code == 200 and response.content == b""
    assert b.post("/cluster/nodes/node-a/drain").status_code == 200, "idempotent"
    wait_until(lambda: a.ready_status() == 503, 1.5, "node-a to stop being ready", 0.05)
    assert {n["id"]: n["state"] for n in b.get("/cluster/nodes").json()}["node-a"] == "draining"
    assert a.wait_exit(30) == 0, a.log()
    assert node_row(db, "node-a") is None
    wait_until(lambda: all_completed(db, 6), 60, "node-b to finish the rest")
    assert_each_completed_once(db, ids)
    assert b.ready_status() == 200
    missing = b.post("/cluster/nodes/node-a/drain")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    bad = b.post("/cluster/nodes/" + "x" * 65 + "/drain")
    assert bad.status_code == 400 and set(bad.json()) == {"error", "detail"}
    assert b.get("/cluster/nodes/node-b/drain").status_code == 405
    assert b.get("/no/such/path").status_code == 404


def test_frozen_node_late_writes_are_fenced(cluster: Cluster, db: str) -> None:
    a = cluster.start("node-a", **ONE_AT_A_TIME)
    cluster.start("node-b", **ONE_AT_A_TIME)
    ids = start_instances(db, 4, ms=3000)
    frozen = wait_until(lambda: {i for i, _ in in_flight_on(db, "node-a")}, 20,
                        "node-a to run something")
    incarnation = node_row(db, "node-a")[1]  # type: ignore[index]
    a.signal_group(signal.SIGSTOP)
    try:
        wait_until(lambda: node_row(db, "node-a")[0] == "dead", 15,  # type: ignore[index]
                   "node-a to be declared dead")
        wait_until(lambda: all(query(db, "SELECT claimed_by = 'node-b' FROM instances "
                                         "WHERE id = %(id)s", {"id": i})[0][0] for i in frozen),
                   20, "node-b to take over node-a's instances")
        # By the database's clock, node-a's handlers (3 s) have returned: it resumes with
        # outcomes to write, not with calls that its restart would cut short.
        wait_until(lambda: query(db, "SELECT clock_timestamp() > max(started_at) + "
                                     "interval '3.1 seconds' FROM test_executions "
                                     "WHERE node_id = 'node-a'")[0][0],
                   10, "node-a's frozen handlers to have run their time")
    finally:
        a.signal_group(signal.SIGCONT)
    wait_until(lambda: all_completed(db, 4), 60, "every instance to complete")
    assert_each_completed_once(db, ids)
    assert all(recorded_by(db)[i] == "node-b" for i in frozen), "late writes were refused"
    wait_until(lambda: "claim lost" in a.log(), 10, "node-a to log its refused write")
    wait_until(lambda: (row := node_row(db, "node-a")) and row[0] == "active"
               and row[1] != incarnation, 10, "node-a to come back as a new incarnation")
    wait_until(lambda: a.ready_status() == 200, 20, "node-a to be ready again")


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT,)],
                         ids=["second-sigterm", "sigint"])
def test_stop_now_releases_running_steps(cluster: Cluster, db: str,
                                         signals: tuple[int, ...]) -> None:
    node = cluster.start("node-a", **ONE_AT_A_TIME)
    start_instances(db, 4, ms=60_000)
    wait_until(lambda: len(in_flight_on(db, "node-a")) == 2, 20, "two steps in flight")
    for number in signals:
        node.signal(number)
        wait_until(lambda: node.ready_status() != 200, 1.0, "/health/ready to turn 503", 0.05)
    assert node.wait_exit(15) == 0, node.log()
    assert states(db) == Counter({"scheduled": 4}), "the running steps were released"
    assert node_row(db, "node-a") is None


def test_drain_timeout_releases_what_still_runs(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a", ORCH8_DRAIN_TIMEOUT_SECS="1", **ONE_AT_A_TIME)
    start_instances(db, 2, ms=60_000)
    wait_until(lambda: len(in_flight_on(db, "node-a")) == 2, 20, "two steps in flight")
    epochs = query(db, "SELECT sum(claim_epoch) FROM instances")[0][0]
    node.signal(signal.SIGTERM)
    assert node.wait_exit(20) == 0, node.log()
    assert states(db) == Counter({"scheduled": 2}), "released, not waited for"
    assert query(db, "SELECT sum(claim_epoch) FROM instances")[0][0] >= epochs
    assert node_row(db, "node-a") is None


def test_systemd_is_told_when_ready_and_when_stopping(cluster: Cluster, db: str,
                                                     tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(30)
        node = cluster.start("node-a", wait_ready=False, NOTIFY_SOCKET=str(tmp_path / "notify"))
        ready = systemd.recv(1000).decode()
        assert ready.startswith("READY=1") and node.ready_status() == 200
        node.signal(signal.SIGTERM)
        # STATUS lines may come first (supervisor.systemd); the stop is announced next.
        wait_until(lambda: systemd.recv(1000).startswith(b"STOPPING=1"), 20, "STOPPING=1")
        assert node.wait_exit(20) == 0


def test_workers_run_the_supervisors_code_whatever_the_directory_it_starts_from(
        cluster: Cluster, db: str, tmp_path: Path) -> None:
    """A node started from a directory that holds a `supervisor` package of its own (a
    checkout of another version, say) runs the installed code in its workers too, and its
    handlers see the node's environment. The workers' forkserver used to import from the
    working directory first (CPython gh-117378): it took this decoy, and no worker came up."""
    here = tmp_path / "operator"
    decoy = here / "supervisor"
    decoy.mkdir(parents=True)
    imported = tmp_path / "decoy-imported"
    (decoy / "__init__.py").write_text("")
    (decoy / "child.py").write_text(f"open({str(imported)!r}, 'w').close()\n")
    node = cluster.start("node-a", cwd=here)  # waits until every worker has booted
    names = ["PYTHONPATH", "PYTHONSAFEPATH"]
    with Client(db) as client:
        client.create_sequence("env", [{"id": "only", "handler": "environment",
                                        "params": {"names": names}}])
        instance = client.start("env")
        assert client.wait(instance.id, timeout_s=30).state == "completed"
        seen = client.get(instance.id).outputs["only"]
    given = cluster.environment("node-a", node.port, {})
    assert seen == {name: given.get(name) for name in names}
    assert not imported.exists()


def test_workers_exit_when_the_supervisor_dies(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a")
    # Its own workers, by ancestry: an earlier test's orphaned worker may still be exiting
    # under the same title.
    workers = set(worker_pids("node-a", under=node.pid))
    assert len(workers) == 2
    node.signal(signal.SIGKILL)
    node.wait_exit(10)
    wait_until(lambda: not workers & set(node.worker_pids()), 10,
               "the orphaned workers to exit")


def test_hung_worker_is_killed_and_restarted(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a", ORCH8_WORKER_TIMEOUT_SECS="2")
    hung = node.worker_pids()[0]
    os.kill(hung, signal.SIGSTOP)
    wait_until(lambda: f"(pid {hung}) killed by SIGKILL" in node.log(), 15, "the kill")
    assert "sent nothing for" in node.log()
    wait_until(lambda: len(node.worker_pids()) == 2 and hung not in node.worker_pids(),
               15, "a replacement worker")


def test_hung_worker_prints_its_stack_before_it_is_killed(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a", ORCH8_WORKER_TIMEOUT_SECS="2", **ONE_AT_A_TIME)
    with Client(db) as client:
        client.create_sequence("hang", [{"id": "a", "handler": "block_loop",
                                         "params": {"s": 60}}])
        client.start("hang")
    wait_until(lambda: "killed by SIGABRT" in node.log(), 30, "the abort")
    log = node.log()
    assert "aborting it (its stack follows)" in log
    # faulthandler's dump names the handler the worker hung in.
    assert "Fatal Python error: Aborted" in log and "in block_loop" in log


def test_worker_boot_failure_stops_the_node(cluster: Cluster, db: str) -> None:
    node = cluster.start("node-a", wait_ready=False, ORCH8_HANDLERS="no_such_module_here")
    assert node.wait_exit(60) == 3
    output = node.log()
    assert "failed at boot: cannot load handler module 'no_such_module_here'" in output
    assert "Traceback" not in output
    assert node_row(db, "node-a") is None


@pytest.mark.parametrize(("args", "extra", "expected"), [
    ((), {"ORCH8_WORKERS": "many"}, "ORCH8_WORKERS"),
    ((), {"ORCH8_WROKERS": "2"}, "unknown environment variable ORCH8_WROKERS"),
    (("--workers", "0"), {}, "ORCH8_WORKERS"),
    (("--heartbeat-interval", "x"), {}, "--heartbeat-interval"),
    # A batch no worker could hold whole is refused, never silently capped.
    (("--batch-size", "500"), {"ORCH8_MAX_IN_FLIGHT": "100"},
     "ORCH8_BATCH_SIZE (500) is larger than ORCH8_MAX_IN_FLIGHT (100)"),
])
def test_bad_configuration_is_one_line(cluster: Cluster, args: tuple[str, ...],
                                       extra: dict[str, str], expected: str) -> None:
    node: Node = cluster.start("node-a", wait_ready=False, args=args, **extra)
    assert node.wait_exit(30) == 2
    lines = node.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch8-supervisor: "), lines
    assert expected in lines[0]


def test_http_address_in_use_stops_the_node(cluster: Cluster, db: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = cluster.start("node-a", wait_ready=False, ORCH8_BIND=f"127.0.0.1:{port}")
        assert node.wait_exit(60) == 1
    lines = node.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"orch8-supervisor: cannot listen on 127.0.0.1:{port}"), lines
    assert node_row(db, "node-a") is None, "nothing registered"


def test_unreachable_database_is_one_line(cluster: Cluster) -> None:
    cluster.dsn = f"host=127.0.0.1 port={free_port()} dbname=nothing connect_timeout=2"
    node = cluster.start("node-a", wait_ready=False)
    assert node.wait_exit(30) == 1
    lines = node.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch8-supervisor: cannot prepare"), lines
