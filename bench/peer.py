"""pgqueuer, the peer orch8 is measured against, run as its authors run it: the asyncpg
driver, uvloop, a `QueueManager` per consumer process, and its drain mode.

pgqueuer acknowledges through buffers and deletes finished jobs, so its drain is timed by
the wall clock from the release of all consumers to the moment the last one's drain-mode
`run()` returns (its buffers flushed: every job acknowledged in the database).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import uvloop
from pgqueuer import QueueManager
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode
from psycopg.conninfo import conninfo_to_dict

from bench.runs import Figure
from bench.workers import Signals, children

ENTRYPOINT = "bench"
CHUNK = 1000  # jobs per enqueue call: one statement each


async def _connect(dsn: str) -> asyncpg.Connection:
    """asyncpg takes URLs only, and libpq's key=value form is what psycopg builds."""
    params = conninfo_to_dict(dsn)
    return await asyncpg.connect(
        host=params.get("host"), port=params.get("port"), user=params.get("user"),
        password=params.get("password"), database=params.get("dbname"))


async def _install(dsn: str) -> None:
    connection = await _connect(dsn)
    try:
        await Queries(AsyncpgDriver(connection)).install()
    finally:
        await connection.close()


async def _enqueue(dsn: str, count: int, warm: bool = False) -> float:
    """Enqueue `count` jobs in lists of `CHUNK`; return the seconds it took. `warm`: one
    job more, enqueued before the clock starts."""
    connection = await _connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(connection))
        if warm:
            # asyncpg's first statement on a connection reads the types it uses from the
            # catalog (8-12 ms here, a tenth of a 5,000-job run): a producer pays it once.
            await queries.enqueue([ENTRYPOINT], [None], [0])
        started = time.perf_counter()
        for first in range(0, count, CHUNK):
            size = min(CHUNK, count - first)
            await queries.enqueue([ENTRYPOINT] * size, [None] * size, [0] * size)
        return time.perf_counter() - started
    finally:
        await connection.close()


def install(dsn: str) -> None:
    """pgqueuer's tables in the (empty) database `dsn`."""
    uvloop.run(_install(dsn))


def enqueue(dsn: str, count: int) -> Figure:
    """`count` jobs enqueued on a connection that has enqueued before."""
    seconds = uvloop.run(_enqueue(dsn, count, warm=True))
    return Figure(count=count, completed=count, seconds=seconds, complete=True)


def consumer(signals: Signals, slot: int, dsn: str, batch: int) -> None:
    """One consumer process: a no-op entrypoint, drained in pgqueuer's drain mode."""

    async def main() -> None:
        connection = await _connect(dsn)
        manager = QueueManager(Queries(AsyncpgDriver(connection)))
        finished = 0

        @manager.entrypoint(ENTRYPOINT)
        async def work(job: Job) -> None:
            nonlocal finished
            finished += 1

        await asyncio.get_running_loop().run_in_executor(None, signals.await_go)
        await manager.run(batch_size=batch, mode=QueueExecutionMode.drain)
        ended = time.time()
        signals.count(finished)
        signals.finished.put(ended)
        await connection.close()

    uvloop.run(main())


def drain(dsn: str, batch: int, consumers: int, count: int, timeout_s: float = 300) -> Figure:
    """A backlog of `count` jobs on a fresh empty database, drained by `consumers`
    processes released together."""
    install(dsn)
    uvloop.run(_enqueue(dsn, count))
    with children(consumer, consumers, dsn, batch) as crew:
        released = time.time()
        crew.signals.go.set()
        ends = crew.finishing_times(timeout_s)
        completed = crew.signals.done.value
    seconds = max(ends) - released
    return Figure(count=count, completed=completed, seconds=seconds,
                  complete=completed == count)
