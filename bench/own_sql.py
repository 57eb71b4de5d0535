"""orch8's own statements in the smallest loop: what the schema and the SQL cost by
themselves, with no engine around them.

Each process sends what a worker sends while a backlog of steps that return at once
lasts: batch after batch, a held claim (`claims.LOCK_DUE`) and, in the same transaction,
the write that completes every instance's one step with output `{}`
(`claims.SETTLE_LOCKED`), pipelined as a worker sends them (the write, its commit, which
begins the next transaction, and the next batch's lock in one round trip), with plain
psycopg (no pool, no asyncio, no handler, no supervisor). Between the raw loop and a real
node it splits the gap in two: the raw loop / this loop is the price of orch8's schema and
statements, this loop / the node the price of the engine (handlers, executor, asyncio,
reports).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from bench.engine import NOOP, Backlog, new_sequence
from bench.runs import Figure
from bench.workers import Signals, children
from orch8.store import claims
from orch8.store.claims import Owner

STEP = NOOP[0]["id"]
EMPTY = orjson.Fragment("{}")
GENERIC_PLANS = claims.GENERIC_PLANS.decode()  # (each held claim's, as a worker sends it)

# Read once, after the drain.
LAST_FINISHED = "SELECT max(finished_at) FROM instances WHERE sequence_name = %(sequence)s"


def loop(signals: Signals, slot: int, dsn: str, batch: int) -> None:
    """One process: lock a batch, complete it in the same transaction, and while batches
    come back full, send the next lock with that write and its commit, as a worker does;
    count each batch once its commit is confirmed; sleep 5 ms when nothing is there; a
    transaction PostgreSQL rolled back goes again. Its node id has no `cluster_nodes`
    row, which the claim does not check (a worker run alone)."""
    owner = Owner(f"own-sql-{slot}", uuid.uuid4(), slot)
    params = claims.claim_params(owner, batch)
    lock = claims.bounded(claims.LOCK_DUE, batch)
    with psycopg.connect(dsn, autocommit=True) as conn:
        signals.await_go()
        while not signals.stop.is_set():
            rows, commit = [], None
            try:
                with conn.pipeline():
                    conn.execute("BEGIN")
                    conn.execute(GENERIC_PLANS)
                    rows = conn.execute(lock, params).fetchall()
                    while True:
                        # (As a held run of `noop` records them: see `claims.Settled`.)
                        settled = [(row[0], row[1], 1, True, row[11]) for row in rows]
                        outputs = [(row[0], STEP, 1, EMPTY) for row in rows]
                        if settled:
                            conn.execute(claims.SETTLE_LOCKED,
                                         claims.settle_params(owner, settled, outputs))
                        chain = len(rows) == batch and not signals.stop.is_set()
                        # Chained, the commit begins the next transaction (as a worker's).
                        commit = conn.execute("COMMIT AND CHAIN" if chain else "COMMIT")
                        if not chain:
                            break  # leaving the pipeline syncs it
                        conn.execute(GENERIC_PLANS)
                        following = conn.execute(lock, params).fetchall()
                        signals.count(len(rows))  # its commit was answered before the rows
                        rows, commit = following, None
            except psycopg.Error as error:
                if commit is not None and committed(commit):
                    signals.count(len(rows))  # what failed came after this commit
                if not claims.rolled_back(error):
                    raise
                continue  # rolled back whole (a deadlock's victim): again, as a worker does
            if rows:
                signals.count(len(rows))
            else:
                time.sleep(0.005)


def committed(commit: psycopg.Cursor[Any]) -> bool:
    """Whether the COMMIT sent on `commit` has come back without an error (this loop
    sends with psycopg's own pipeline; a worker's replies are `orch8.store.wire.Sent`)."""
    result = commit.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.COMMAND_OK


def drain(dsn: str, batch: int, processes: int, count: int, timeout_s: float = 300,
          at_release: Callable[[], object] | None = None) -> Figure:
    """`processes` loops on a fresh migrated database `dsn`; a backlog of one-step
    instances, inserted in one open transaction, is committed once they all poll, and
    timed from its commit to the last finish (counted through a shared counter, an O(1)
    read). `at_release` is called just before the commit (to read counters there)."""
    sequence = new_sequence(dsn)
    backlog = Backlog(dsn, sequence, count)
    with children(loop, processes, dsn, batch) as crew:
        crew.signals.go.set()
        if at_release is not None:
            at_release()
        released = backlog.release()
        complete = crew.wait_count(count, timeout_s)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(LAST_FINISHED, {"sequence": sequence}).fetchone()
    last = row[0] if row else None
    seconds = (last - released).total_seconds() if last else float("nan")
    return Figure(count=count, completed=crew.signals.done.value, seconds=seconds,
                  complete=complete)
