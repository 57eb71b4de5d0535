"""Rate limits against the real SQL: the queries, the admission, and a worker obeying it."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

import orch8
from orch8 import Client, State, StepContext
from orch8.config import Settings
from orch8.engine.limits import LimitWatch
from orch8.errors import DefinitionError, NotFound
from orch8.store import claims, rate_limits
from orch8.store.claims import Claimed, Owner
from tests.engine_helpers import run_workers_until

_lock = threading.Lock()
starts: dict[str, list[float]] = {}


@orch8.handler("test_limited")
def limited(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Record when each call starts, per test (params.run)."""
    with _lock:
        starts.setdefault(params["run"], []).append(time.time())
    return {}


@pytest.fixture
def client(dsn):
    with Client(dsn) as client:
        yield client


@pytest.mark.parametrize(("fields", "named"), [
    (("bad name!", 1, 1000), "handler"),
    (("h", 0, 1000), "max_calls"),
    (("h", 100_001, 1000), "max_calls"),
    (("h", True, 1000), "max_calls"),
    (("h", 1, 9), "window_ms"),
    (("h", 1, 86_400_001), "window_ms"),
    (("h", 1, 1.5), "window_ms"),
])
def test_a_limit_out_of_bounds_names_its_field(client, fields, named):
    with pytest.raises(DefinitionError) as error:
        client.set_rate_limit(*fields)
    assert error.value.field == named


def test_set_list_replace_and_delete(client):
    assert client.list_rate_limits() == []
    made = client.set_rate_limit("mail", 10, 1000)
    assert (made.handler, made.max_calls, made.window_ms) == ("mail", 10, 1000)
    client.set_rate_limit("sms", 1, 60_000)
    client.set_rate_limit("mail", 20, 500)
    listed = client.list_rate_limits()
    assert [(r.handler, r.max_calls, r.window_ms, r.calls_in_window) for r in listed] == [
        ("mail", 20, 500, 0), ("sms", 1, 60_000, 0)]
    assert set(listed[0].as_json()) == {"handler", "max_calls", "window_ms",
                                        "calls_in_window", "created_at", "updated_at"}
    client.delete_rate_limit("mail")
    with pytest.raises(NotFound):
        client.delete_rate_limit("mail")
    assert [r.handler for r in client.list_rate_limits()] == ["sms"]


def test_workers_learn_of_limits_from_the_database(client, dsn):
    async def seen() -> list[bool]:
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False,
                                   kwargs={"autocommit": True})
        await pool.open()
        watch = LimitWatch(pool)
        answers = []
        try:
            for change in (lambda: None, lambda: client.set_rate_limit("h", 1, 1000),
                           lambda: client.delete_rate_limit("h")):
                await asyncio.to_thread(change)
                await watch.run_once()
                answers.append(watch.applies("h"))
        finally:
            await pool.close()
        return answers

    assert asyncio.run(seen()) == [False, True, False]


def running_instances(conn: psycopg.Connection, count: int) -> list[Claimed]:
    """`count` instances claimed (running) by one owner, ready to ask for admission."""
    conn.execute("INSERT INTO sequences (name, version, steps) VALUES ('s', 1, '[]')")
    conn.execute("INSERT INTO instances (id, sequence_name, sequence_version) "
                 "SELECT gen_random_uuid(), 's', 1 FROM generate_series(1, %s)", (count,))

    async def claim() -> list[Claimed]:
        async with await psycopg.AsyncConnection.connect(
                conn.info.dsn, autocommit=True) as aconn:
            return await claims.claim(aconn, Owner("n", uuid.uuid4(), 0), count)

    return asyncio.run(claim())


def admit_all(dsn: str, instances: list[Claimed], handler: str,
              epoch_offset: int = 0) -> list[rate_limits.Admission]:
    async def run() -> list[rate_limits.Admission]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return [await rate_limits.admit(aconn, c.id, c.epoch + epoch_offset, handler)
                    for c in instances]

    return asyncio.run(run())


def test_a_full_window_defers_the_step_without_failing_or_counting_it(client, dsn, conn):
    client.set_rate_limit("h", 3, 60_000)
    instances = running_instances(conn, 6)
    conn.execute("UPDATE instances SET attempt = 1, delay_done = true")
    answers = admit_all(dsn, instances, "h")
    assert [a.admitted for a in answers] == [True] * 3 + [False] * 3
    assert all(a.held for a in answers)
    deferred = [a.deferred_until for a in answers[3:]]
    # Booked a minute out (when the oldest call leaves the window), one interval apart.
    gaps = [(later - earlier).total_seconds()
            for earlier, later in zip(deferred, deferred[1:], strict=False)]
    assert gaps == [pytest.approx(20.0, abs=0.01)] * 2
    rows = conn.execute("""
        SELECT state, attempt, delay_done, claimed_by, last_error,
               next_fire_at > now() + interval '59 seconds'
        FROM instances WHERE id = ANY(%s)""", ([c.id for c in instances[3:]],)).fetchall()
    assert rows == [("scheduled", 1, True, None, None, True)] * 3
    assert client.list_rate_limits()[0].calls_in_window == 3


def test_admission_is_fenced_by_the_claim(client, dsn, conn):
    client.set_rate_limit("h", 1, 60_000)
    instances = running_instances(conn, 1)
    [stale] = admit_all(dsn, instances, "h", epoch_offset=-1)
    assert (stale.held, stale.admitted) == (False, False)
    # The refused call took no slot: the rightful holder still gets it.
    [fresh] = admit_all(dsn, instances, "h")
    assert fresh.admitted


def test_a_handler_without_a_limit_is_admitted(dsn, conn):
    [answer] = admit_all(dsn, running_instances(conn, 1), "free")
    assert (answer.held, answer.admitted) == (True, True)


def test_lowering_a_limit_keeps_the_calls_already_made(client, dsn, conn):
    client.set_rate_limit("h", 5, 60_000)
    instances = running_instances(conn, 6)
    assert all(a.admitted for a in admit_all(dsn, instances[:5], "h"))
    client.set_rate_limit("h", 3, 60_000)
    assert client.list_rate_limits()[0].calls_in_window == 3
    [late] = admit_all(dsn, instances[5:], "h")
    assert not late.admitted


def test_workers_call_a_limited_handler_at_most_max_per_sliding_window(client, dsn):
    run = uuid.uuid4().hex
    client.create_sequence("limited", [
        {"id": "wait", "handler": "noop", "delay_ms": 1},
        {"id": "call", "handler": "test_limited", "params": {"run": run}},
    ])
    client.set_rate_limit("test_limited", 4, 400)
    ids = [client.start("limited").id for _ in range(16)]

    def all_done() -> bool:
        return all(client.get(i).state == State.COMPLETED for i in ids)

    team = run_workers_until(dsn, all_done, workers=2, timeout_s=30,
                             settings=Settings(tick_interval_ms=20, commit_linger_ms=0.0))
    calls = sorted(starts[run])
    assert len(calls) == 16
    # Any 5 consecutive calls span at least a window: never 5 calls in 400 ms. (Handler
    # start times, taken in Python just after the admission stamped the slot.)
    closest = min(b - a for a, b in zip(calls, calls[4:], strict=False))
    print(f"\nclosest 5 calls span {closest * 1000:.1f} ms (window 400 ms)")
    assert closest >= 0.4
    assert sum(worker.stats.counts["rate_limited"] for worker in team) > 0
    # Deferred, never failed: no error was ever recorded.
    assert {client.get(i).last_error for i in ids} == {None}
