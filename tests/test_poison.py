"""A step whose handler ends its own worker process: charged, dead-lettered, contained.

Real supervisors, real worker processes that really die (`os._exit(1)`, or SIGKILL of
themselves, as a segfault or the OOM killer would), real PostgreSQL. The poison handler
writes every execution to a ledger file outside the database (fsync'd before it dies), so
"exactly max_attempts executions" is counted by something the database cannot forget.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from supervisor_process import Cluster, Node, ReadinessWatch, wait_until

from orch8 import Client

MAX_ATTEMPTS = 3
# One instance per worker at a time: a worker the poison kills runs nothing else, so
# every other instance's outcome depends only on whether the poison held it back.
ONE_AT_A_TIME = {"ORCH8_MAX_IN_FLIGHT": "1", "ORCH8_BATCH_SIZE": "1"}
ERRORS = {"exit": "worker exited with code 1 while running step boom",
          "sigkill": "worker killed by SIGKILL while running step boom"}


@pytest.fixture
def cluster(dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(dsn, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def start_workload(dsn: str, ledger: Path, mode: str, poison: str = "poison",
                   before: tuple[dict[str, Any], ...] = ()) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """200 plain instances, the poison (after the steps `before`), 200 more: (poison id,
    the others' ids)."""
    with Client(dsn) as client:
        client.create_sequence("plain", [{"id": "only", "handler": "noop"}])
        client.create_sequence("p", [*before, {
            "id": "boom", "handler": poison,
            "params": {"ledger": str(ledger), "mode": mode},
            "retry": {"max_attempts": MAX_ATTEMPTS, "initial_backoff_ms": 100}}])
        before = client.start_many([{"sequence": "plain", "input": {"n": n}}
                                    for n in range(200)])
        created = client.start("p")
        after = client.start_many([{"sequence": "plain", "input": {"n": n}}
                                   for n in range(200, 400)])
    return created.id, [c.id for c in before + after]


def instance(dsn: str, instance_id: uuid.UUID) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT state, attempt, last_error FROM instances WHERE id = %s",
                           (instance_id,)).fetchone()
    assert row is not None
    return {"state": row[0], "attempt": row[1], "last_error": row[2]}


def states(dsn: str, ids: list[uuid.UUID]) -> Counter[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT state, count(*) FROM instances WHERE id = ANY(%s) "
                            "GROUP BY state", (ids,)).fetchall()
    return Counter(dict(rows))


def ledger_entries(ledger: Path) -> list[dict[str, Any]]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def metric(node: Node, name: str) -> float:
    text = node.get("/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def run_poison_scenario(cluster: Cluster, dsn: str, ledger: Path, mode: str,
                        node_ids: list[str]) -> list[Node]:
    nodes = [cluster.start(node_id, **ONE_AT_A_TIME) for node_id in node_ids]
    with ReadinessWatch(nodes) as watch:
        poison, others = start_workload(dsn, ledger, mode)
        wait_until(lambda: instance(dsn, poison)["state"] == "failed", 120,
                   "the poison instance to reach the dead letter")
        wait_until(lambda: states(dsn, others)["completed"] == len(others), 120,
                   "every other instance to complete")
    executions = ledger_entries(ledger)
    assert [entry["attempt"] for entry in executions] == list(range(1, MAX_ATTEMPTS + 1))
    assert len({entry["pid"] for entry in executions}) == MAX_ATTEMPTS, "each run killed its worker"
    assert instance(dsn, poison) == {"state": "failed", "attempt": MAX_ATTEMPTS,
                                     "last_error": ERRORS[mode]}
    dead_letter = nodes[0].get("/instances/dlq").json()
    assert str(poison) in json.dumps(dead_letter)
    # Ready throughout, except while a node had no worker up (and then it says so).
    assert len(watch.answers) > 20
    unready = [answer for answer in watch.answers if answer[1] != 200]
    assert all(answer[1:3] == (503, "no worker is up") for answer in unready), unready
    return nodes


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_poison_is_charged_and_dead_lettered_on_one_node(cluster: Cluster, dsn: str,
                                                         tmp_path: Path, mode: str) -> None:
    [node] = run_poison_scenario(cluster, dsn, tmp_path / "ledger.jsonl", mode, ["node-a"])
    assert metric(node, "orch8_worker_deaths_total") == MAX_ATTEMPTS
    assert metric(node, "orch8_steps_retried_total") == MAX_ATTEMPTS - 1
    assert metric(node, "orch8_instances_failed_total") == 1
    wait_until(lambda: metric(node, "orch8_worker_restarts_total") == MAX_ATTEMPTS, 60,
               "every dead worker to be restarted")
    log = node.log()
    assert log.count(f"{ERRORS[mode]}; retrying in") == MAX_ATTEMPTS - 1
    assert log.count(f"{ERRORS[mode]}; failed (dead letter)") == 1
    assert "restarting worker 1 in 0.0s" not in log and "restarting worker 2 in 0.0s" not in log


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_poison_costs_two_nodes_max_attempts_deaths_in_total(cluster: Cluster, dsn: str,
                                                             tmp_path: Path, mode: str) -> None:
    nodes = run_poison_scenario(cluster, dsn, tmp_path / "ledger.jsonl", mode,
                                ["node-a", "node-b"])
    deaths = sum(metric(node, "orch8_worker_deaths_total") for node in nodes)
    assert deaths == MAX_ATTEMPTS
    assert sum(metric(node, "orch8_instances_failed_total") for node in nodes) == 1


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
@pytest.mark.parametrize("chained", [False, True], ids=["first-step", "after-a-step"])
def test_a_poison_that_kills_its_process_inside_a_held_claim_is_charged(
        cluster: Cluster, dsn: str, tmp_path: Path, mode: str, chained: bool) -> None:
    # A coroutine that never suspends runs its first attempt inside a held claim, with its
    # row still scheduled: the row is free the moment the process dies, so another worker
    # may run that first attempt again before the supervisor charges it. Every later
    # attempt runs under a claim, and runs once. After a step that ran in the same held
    # claim, the charge lands on the row at that earlier step, whose next run is claimed:
    # the poison's first attempt then runs once more, claimed.
    ledger = tmp_path / "ledger.jsonl"
    node = cluster.start("node-a", **ONE_AT_A_TIME)
    first = ({"id": "first", "handler": "noop"},) if chained else ()
    poison, others = start_workload(dsn, ledger, mode, poison="poison_at_once", before=first)
    wait_until(lambda: instance(dsn, poison)["state"] == "failed", 120,
               "the poison instance to reach the dead letter")
    wait_until(lambda: states(dsn, others)["completed"] == len(others), 120,
               "every other instance to complete")
    attempts = Counter(entry["attempt"] for entry in ledger_entries(ledger))
    assert set(attempts) == set(range(1, MAX_ATTEMPTS + 1)), attempts
    assert 1 + chained <= attempts[1] <= 2 + chained, "again at most by the other worker"
    assert all(attempts[n] == 1 for n in range(2, MAX_ATTEMPTS + 1)), attempts
    assert instance(dsn, poison) == {"state": "failed", "attempt": MAX_ATTEMPTS,
                                     "last_error": ERRORS[mode]}
    wait_until(lambda: metric(node, "orch8_worker_deaths_total") == attempts.total(), 60,
               "every death to be counted")
