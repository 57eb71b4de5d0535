"""The ceiling: the smallest queue loop PostgreSQL allows, on its own plain tables.

Each process claims a batch with one `UPDATE … FOR UPDATE SKIP LOCKED RETURNING`, then
inserts the outputs and completes the batch in one statement, with plain psycopg (no
pool, no asyncio, no handler). Nothing of orch8 is used, so the ratio to it is the price
of everything orch8 adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

from bench.runs import Figure
from bench.server import commit_stamped
from bench.workers import Signals, children

SCHEMA = """
CREATE TABLE raw_jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state       text NOT NULL DEFAULT 'queued',
    payload     jsonb NOT NULL DEFAULT '{}',
    finished_at timestamptz
);
CREATE INDEX raw_jobs_queued ON raw_jobs (id) WHERE state = 'queued';
CREATE TABLE raw_outputs (job_id bigint PRIMARY KEY, output jsonb NOT NULL)
"""

BACKLOG = "INSERT INTO raw_jobs (payload) SELECT '{}' FROM generate_series(1, %(count)s)"

# SKIP LOCKED: a row another process is claiming is passed over, never waited on.
CLAIM = """
UPDATE raw_jobs SET state = 'running'
WHERE id IN (SELECT id FROM raw_jobs WHERE state = 'queued'
             ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""

FINISH = """
WITH done AS (
    UPDATE raw_jobs SET state = 'done', finished_at = now()
    WHERE id = ANY(%(ids)s) RETURNING id, payload
)
INSERT INTO raw_outputs (job_id, output) SELECT id, payload FROM done
"""

# Read once, after the drain.
LAST_FINISHED = "SELECT max(finished_at) FROM raw_jobs"


def loop(signals: Signals, slot: int, dsn: str, batch: int) -> None:
    """One raw process: claim, finish, count; sleep 5 ms when nothing is there."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        signals.await_go()
        while not signals.stop.is_set():
            rows = conn.execute(CLAIM, {"batch": batch}).fetchall()
            if not rows:
                time.sleep(0.005)
                continue
            conn.execute(FINISH, {"ids": [row[0] for row in rows]})
            signals.count(len(rows))


def drain(dsn: str, batch: int, processes: int, count: int, timeout_s: float = 300,
          at_release: Callable[[], object] | None = None) -> Figure:
    """`processes` raw loops on a fresh empty database `dsn`; the backlog is inserted in
    one transaction once they all poll, and timed from its commit to the last finish.
    `at_release` is called just before that commit (to read counters there)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    with children(loop, processes, dsn, batch) as crew:
        crew.signals.go.set()
        with psycopg.connect(dsn) as conn:
            conn.execute(BACKLOG, {"count": count})
            if at_release is not None:
                at_release()
            released = commit_stamped(conn)
            complete = crew.wait_count(count, timeout_s)
            last = conn.execute(LAST_FINISHED).fetchone()[0]  # type: ignore[index]
    seconds = (last - released).total_seconds() if last else float("nan")
    return Figure(count=count, completed=crew.signals.done.value, seconds=seconds,
                  complete=complete)
