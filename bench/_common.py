"""Shared set-up for the benchmarks: a scratch database, and a backlog released at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from bench.server import DATA_DIR, Server, database_name
from orch8.config import Settings
from orch8.engine.worker import Worker
from orch8.migrate import migrate
from orch8.store.claims import Owner


def server_dsn() -> str:
    """DATABASE_URL if set, else an embedded server in a scratch directory (`Server.open`,
    which also drops the databases of runs no longer alive there)."""
    return Server.open(DATA_DIR).dsn


def scratch_database(server: str) -> str:
    """A new, migrated database for one benchmark run; returns its DSN."""
    name = database_name()
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server, dbname=name)
    migrate(dsn)
    return dsn


def drop_database(server: str, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def park_backlog(dsn: str, count: int, sequence: str = "bench") -> None:
    """Insert `count` one-step noop instances, due far in the future (not claimable yet)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sequences (name, version, steps) VALUES (%s, 1, "
            "'[{\"id\": \"only\", \"handler\": \"noop\", \"params\": {}}]') ON CONFLICT DO NOTHING",
            (sequence,))
        conn.execute(
            "INSERT INTO instances (id, sequence_name, sequence_version, next_fire_at) "
            "SELECT gen_random_uuid(), %s, 1, 'infinity' FROM generate_series(1, %s)",
            (sequence, count))
        conn.execute("ANALYZE instances")


def release_backlog(dsn: str) -> None:
    """Make the parked backlog due now, and wake the workers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE instances SET next_fire_at = now() WHERE next_fire_at = 'infinity'")
        conn.execute("SELECT pg_notify('orch8_work', '')")


def drained_rate(dsn: str, count: int) -> float | None:
    """Instances per second from release to the last completion, by the database clock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'completed'), "
            "extract(epoch FROM max(finished_at) - min(claimed_at)) "
            "FROM instances").fetchone()
    done, seconds = row
    if done < count or not seconds:
        return None
    return count / float(seconds)


def engine_worker(dsn: str, slot: int, ready: Any, stop: Any, options: dict[str, Any]) -> None:
    """A child process running one real `Worker` (settings from `options`) until `stop`."""
    settings = Settings(**options)

    async def main() -> None:
        stopping = asyncio.Event()
        worker = Worker(settings, dsn, Owner("bench", uuid.UUID(int=1), slot))
        task = asyncio.create_task(worker.run(stopping))
        ready.release()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        stopping.set()
        await task

    asyncio.run(main())


def timed_drain(dsn: str, target: Callable[..., None], processes: int, options: dict[str, Any],
                rate: Callable[[], float | None], timeout_s: float = 300) -> float:
    """Start `processes` children running `target`, release the parked backlog once they
    are all ready, and return `rate()` once it has a figure (the backlog is drained)."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Semaphore(0), context.Event()
    children = [context.Process(target=target, args=(dsn, slot, ready, stop, options))
                for slot in range(processes)]
    for child in children:
        child.start()
    try:
        for _ in children:
            ready.acquire()
        time.sleep(0.5)  # let every worker open its pool and reach its idle wait
        release_backlog(dsn)
        deadline = time.monotonic() + timeout_s
        figure = None
        while figure is None and time.monotonic() < deadline:
            time.sleep(0.05)
            figure = rate()
    finally:
        stop.set()
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
    if figure is None:
        raise RuntimeError(f"backlog not drained within {timeout_s:.0f} s")
    return figure
