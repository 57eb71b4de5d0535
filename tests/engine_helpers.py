"""Run real `Worker`s in this process against the test database until a condition holds."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from orch8.config import Settings
from orch8.engine.worker import Worker
from orch8.store.claims import Owner, StepDone, refused_steps

FAST = Settings(tick_interval_ms=20, commit_linger_ms=0.0, drain_timeout_s=10)

# A worker LISTENs on its own connection once its pool is open, before its first claim;
# the statement stays in pg_stat_activity while the connection waits for notifications.
LISTENERS = """
FROM pg_stat_activity
WHERE datname = current_database() AND query = 'LISTEN orch8_work'
"""
LISTENING = f"SELECT count(*) {LISTENERS}"

# A claim statement (or a write that also claims: both read the node row FOR KEY SHARE)
# waiting for a lock: the signal a lock-order test waits for before its next move.
WAITING_CLAIM = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                 "AND query LIKE '%%FOR KEY SHARE%%'")


def listening_workers(dsn: str) -> int:
    """How many workers are listening for NOTIFY on the test database now."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(LISTENING).fetchone()
    assert row is not None
    return int(row[0])


def wait_for_listeners(dsn: str, count: int, timeout_s: float = 60.0) -> None:
    """Wait until `count` workers listen for NOTIFY (TimeoutError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while listening_workers(dsn) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} workers listening after {timeout_s}s")
        time.sleep(0.02)


def run_workers_until(
    dsn: str,
    done: Callable[[], bool],
    *,
    settings: Settings = FAST,
    workers: int = 1,
    timeout_s: float = 20.0,
) -> list[Worker]:
    """Run `workers` workers until `done()` is true (checked from a thread), then stop them."""

    async def main() -> list[Worker]:
        stop = asyncio.Event()
        incarnation = uuid.uuid4()
        team = [Worker(settings, dsn, Owner("test-node", incarnation, slot))
                for slot in range(workers)]
        tasks = [asyncio.create_task(worker.run(stop)) for worker in team]
        deadline = time.monotonic() + timeout_s
        try:
            while not await asyncio.to_thread(done):
                if time.monotonic() > deadline:
                    raise TimeoutError("condition not reached in time")
                if any(task.done() for task in tasks):
                    break
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        return team

    return asyncio.run(main())


async def finish_steps(conn: psycopg.AsyncConnection[Any],
                       done: Sequence[StepDone]) -> set[uuid.UUID]:
    """Apply step successes as the committer does; return the ids whose fence held (the
    engine only needs the refused ones, `claims.refused_steps`)."""
    refused = await refused_steps(conn, done)
    return {d.id for d in done if d.id not in refused}
