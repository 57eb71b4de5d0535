"""A stop is bounded whatever a handler does, and a claim orch8 gives back is never still
being worked on: real supervisors, a plain (thread-run) handler that cannot be cancelled,
real signals.

The `ticker` handler writes to a ledger file when it starts and every 50 ms while it runs,
so the file shows whether a step was still running somewhere when another node started it.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from supervisor_process import Cluster, wait_until

from orch8 import Client

ONE_AT_A_TIME = {"ORCH8_MAX_IN_FLIGHT": "1", "ORCH8_BATCH_SIZE": "1"}
DRAIN_TIMEOUT_S = 2
# The supervisor's grace after the drain timeout (supervisor.arbiter.DRAIN_GRACE_S).
GRACE_S = 5


@pytest.fixture
def cluster(dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(dsn, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def start_tickers(dsn: str, ledger: Path, count: int, ms_on_a: int) -> list[uuid.UUID]:
    """Steps that run `ms_on_a` on node-a and a tenth of a second anywhere else."""
    with Client(dsn) as client:
        client.create_sequence("long", [{
            "id": "tick", "handler": "ticker",
            "params": {"ledger": str(ledger), "ms": 100, "ms_on": {"node-a": ms_on_a}}}])
        return [c.id for c in client.start_many([{"sequence": "long"}] * count)]


def ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def started_on(path: Path, node: str) -> set[str]:
    return {e["instance"] for e in ledger(path) if e["event"] == "start" and e["node"] == node}


def completed(dsn: str, ids: list[uuid.UUID]) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM instances WHERE id = ANY(%s) "
                           "AND state = 'completed'", (ids,)).fetchone()
    return bool(row) and row[0] == len(ids)


def assert_never_ran_twice_at_once(path: Path) -> None:
    """For every instance, each node's run ended (its last line) before the next began."""
    runs: dict[tuple[str, int], list[float]] = {}
    order: dict[str, list[tuple[str, int]]] = {}
    for entry in ledger(path):
        run = (entry["instance"], entry["pid"])
        if run not in runs:
            order.setdefault(entry["instance"], []).append(run)
        runs.setdefault(run, []).append(entry["t"])
    for instance, instance_runs in order.items():
        for earlier, later in zip(instance_runs, instance_runs[1:], strict=False):
            assert max(runs[earlier]) < min(runs[later]), (
                f"instance {instance} ran in pid {earlier[1]} until "
                f"{max(runs[earlier]):.2f} but started in pid {later[1]} at "
                f"{min(runs[later]):.2f}")


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGTERM, signal.SIGTERM)],
                         ids=["drain", "stop-now"])
def test_a_stop_is_bounded_while_a_plain_handler_runs(cluster: Cluster, dsn: str,
                                                      tmp_path: Path,
                                                      signals: tuple[int, ...]) -> None:
    a = cluster.start("node-a", ORCH8_DRAIN_TIMEOUT_SECS=str(DRAIN_TIMEOUT_S), **ONE_AT_A_TIME)
    path = tmp_path / "ledger.jsonl"
    ids = start_tickers(dsn, path, 2, ms_on_a=15_000)
    wait_until(lambda: len(started_on(path, "node-a")) == 2, 30, "both steps to start")
    b = cluster.start("node-b", **ONE_AT_A_TIME)
    workers = a.worker_pids()
    for number in signals:
        a.signal(number)
    # Before the fix the workers waited for their handler threads (15 s).
    assert a.wait_exit(DRAIN_TIMEOUT_S + GRACE_S) == 0, a.log()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert "handlers still running cannot be stopped" in a.log()
    assert "killing every worker" not in a.log(), "the workers ended by themselves"
    # Released once the processes were gone (uncharged: the stop was not the steps' doing),
    # and run to the end on node-b without overlapping the first runs.
    wait_until(lambda: completed(dsn, ids), 60, "node-b to complete both")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT max(attempt) FROM step_outputs").fetchone() == (1,)
    assert not [e for e in ledger(path) if e["event"] == "end" and e["node"] == "node-a"]
    assert_never_ran_twice_at_once(path)
    assert b.ready_status() == 200


def test_orphaned_workers_stop_their_handlers_with_them(cluster: Cluster, dsn: str,
                                                       tmp_path: Path) -> None:
    a = cluster.start("node-a", **ONE_AT_A_TIME)
    path = tmp_path / "ledger.jsonl"
    ids = start_tickers(dsn, path, 2, ms_on_a=15_000)
    wait_until(lambda: len(started_on(path, "node-a")) == 2, 30, "node-a to run two steps")
    b = cluster.start("node-b", **ONE_AT_A_TIME)
    workers = a.worker_pids()
    a.signal(signal.SIGKILL)  # the supervisor alone: its workers are orphaned
    a.wait_exit(10)
    wait_until(lambda: not [pid for pid in workers if Path(f"/proc/{pid}").exists()], 10,
               "the orphaned workers to exit")
    killed_at = time.time()
    wait_until(lambda: completed(dsn, ids), 90, "node-b to complete everything")
    assert not [e for e in ledger(path) if e["event"] == "end" and e["node"] == "node-a"]
    assert not [e for e in ledger(path) if e["node"] == "node-a" and e["t"] > killed_at]
    assert_never_ran_twice_at_once(path)
    assert b.ready_status() == 200
