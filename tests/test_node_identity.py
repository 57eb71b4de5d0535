"""One node id, one live node: a second process with a live node's ORCH8_NODE_ID refuses to
start, and a node restarted on the same host after a crash starts at once."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from supervisor_process import Cluster, wait_until

from orch8 import Client

ONE_AT_A_TIME = {"ORCH8_MAX_IN_FLIGHT": "1", "ORCH8_BATCH_SIZE": "1"}


@pytest.fixture
def clusters(dsn: str, tmp_path: Path) -> Iterator[tuple[Cluster, Cluster]]:
    # Two harnesses so that two processes with one node id keep separate logs.
    first, second = Cluster(dsn, tmp_path / "first"), Cluster(dsn, tmp_path / "second")
    for cluster in (first, second):
        cluster.log_dir.mkdir()
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def node_row(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT incarnation, state, pid FROM cluster_nodes "
                           "WHERE id = 'node-a'").fetchone()
    assert row is not None
    return tuple(row)


def running_claims(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(
            "SELECT id, claim_epoch, claim_incarnation FROM instances "
            "WHERE state = 'running' ORDER BY id").fetchall()]


def test_a_second_process_with_a_live_nodes_id_refuses_to_start(
        clusters: tuple[Cluster, Cluster], dsn: str) -> None:
    first, second = clusters
    holder = first.start("node-a", **ONE_AT_A_TIME)
    with Client(dsn) as client:
        client.create_sequence("slow", [{"id": "s", "handler": "sleep",
                                         "params": {"ms": 30_000}}])
        client.start_many([{"sequence": "slow"}] * 2)
    wait_until(lambda: len(running_claims(dsn)) == 2, 30, "node-a to run two steps")
    before, claims = node_row(dsn), running_claims(dsn)
    newcomer = second.start("node-a", wait_ready=False, **ONE_AT_A_TIME)
    assert newcomer.wait_exit(60) == 1
    lines = newcomer.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert re.match(rf"orch8-supervisor: node id node-a is held by a live node \(host \S+, "
                    rf"pid {holder.pid}, last heartbeat \d+\.\ds ago\)", lines[0]), lines[0]
    assert node_row(dsn) == before, "the holder keeps its registration"
    assert running_claims(dsn) == claims, "and its claims"
    assert holder.ready_status() == 200 and holder.process.poll() is None


def test_a_node_restarted_after_a_crash_takes_its_id_back_at_once(
        clusters: tuple[Cluster, Cluster], dsn: str) -> None:
    first, second = clusters
    # A long threshold: waiting for the crashed holder to go stale would take a minute.
    crashed = first.start("node-a", ORCH8_STALE_THRESHOLD_SECS="60")
    old = node_row(dsn)
    crashed.signal_group(signal.SIGKILL)
    crashed.wait_exit(10)
    wait_until(lambda: not crashed.worker_pids(), 10, "the crashed node's workers to exit")
    again = second.start("node-a", ORCH8_STALE_THRESHOLD_SECS="60")
    assert again.ready_status() == 200
    incarnation, state, pid = node_row(dsn)
    assert (state, pid) == ("active", again.pid) and incarnation != old[0]
