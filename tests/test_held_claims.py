"""The held claim: a step that returns at once runs while its row is locked, and its
outcome is written in the locking transaction; whatever must wait goes on under a claim.

Real workers against the real server. A trigger records every state change of every
instance, so the tests read from the database which path each instance took.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from orch8 import Client, HandlerError, StepContext, handler
from orch8.engine.executor import Executor, Held, HeldConflict
from orch8.engine.stats import WorkerStats
from orch8.engine.worker import Worker
from orch8.handlers.registry import default_registry
from orch8.store import claims, nodes, wire
from orch8.store.claims import Owner
from tests.engine_helpers import FAST, run_workers_until

TRANSITIONS = """
CREATE TABLE test_transitions (
    instance_id uuid NOT NULL,
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION test_record_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_transitions (instance_id, from_state, to_state)
    VALUES (NEW.id, OLD.state, NEW.state);
    RETURN NULL;
END
$$;
CREATE TRIGGER test_transitions AFTER UPDATE OF state ON instances
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION test_record_transition();
"""

RUNS: Counter[str] = Counter()  # executions of `held_counted`, by instance id


@handler("held_raises_at_once")
async def raises_at_once(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    raise HandlerError("refused at once", retryable=False)


@handler("held_counted")
async def counted(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Count this execution; the first one also ends every worker session (an outage that
    strikes between a held claim's handler and its commit)."""
    RUNS[str(ctx.instance_id)] += 1
    if sum(RUNS.values()) == 1:
        with psycopg.connect(params["dsn"], autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name LIKE 'orch8 worker %'")
    return {"runs": RUNS[str(ctx.instance_id)]}


@pytest.fixture
def client(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TRANSITIONS)
    with Client(dsn) as client:
        yield client


def paths(dsn: str) -> dict[uuid.UUID, list[tuple[str, str]]]:
    """Each instance's state changes, in order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT instance_id, from_state, to_state FROM test_transitions "
                            "ORDER BY at").fetchall()
    found: dict[uuid.UUID, list[tuple[str, str]]] = {}
    for instance_id, before, after in rows:
        found.setdefault(instance_id, []).append((before, after))
    return found


def finished(client: Client, ids: list[uuid.UUID]) -> Any:
    return lambda: all(client.get(i).state in ("completed", "failed") for i in ids)


def test_a_step_that_returns_at_once_is_recorded_inside_its_claim(dsn: str, client: Client
                                                                   ) -> None:
    client.create_sequence("one", [{"id": "a", "handler": "noop", "params": {"x": 1}}])
    ids = [c.id for c in client.start_many([{"sequence": "one"}] * 50)]
    [worker] = run_workers_until(dsn, finished(client, ids))
    # Never `running`: one write took each from scheduled to completed, epoch and all.
    assert paths(dsn) == {i: [("scheduled", "completed")] for i in ids}
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT claim_epoch, claimed_by, finished_at >= claimed_at, "
                            "count(o.*) FROM instances i JOIN step_outputs o "
                            "ON o.instance_id = i.id GROUP BY 1, 2, 3").fetchall()
    assert rows == [(1, "test-node", True, 50)]
    assert all(client.get(i).outputs == {"a": {"x": 1}} for i in ids)
    counts = worker.stats.counts
    assert (counts["claimed"], counts["completed"]) == (50, 50)
    assert counts["claimed_with_finish"] == 0 and worker.in_flight == 0


def test_what_must_wait_goes_on_under_a_claim(dsn: str, client: Client) -> None:
    client.create_sequence("two", [{"id": "a", "handler": "noop"},
                                   {"id": "b", "handler": "noop"}])
    client.create_sequence("then_waits", [{"id": "a", "handler": "noop"},
                                          {"id": "b", "handler": "sleep", "params": {"ms": 20}},
                                          {"id": "c", "handler": "noop"}])
    client.create_sequence("suspends", [{"id": "a", "handler": "sleep", "params": {"ms": 20}}])
    client.create_sequence("plain", [{"id": "a", "handler": "fail",
                                      "params": {"message": "plain"}}])
    client.create_sequence("raises", [{"id": "a", "handler": "held_raises_at_once"}])
    client.create_sequence("delayed", [{"id": "a", "handler": "noop", "delay_ms": 10}])
    two, then_waits, suspends, plain, raises, delayed = (
        client.start(name).id
        for name in ("two", "then_waits", "suspends", "plain", "raises", "delayed"))
    run_workers_until(dsn, finished(client, [two, then_waits, suspends, plain, raises,
                                             delayed]))

    found = paths(dsn)
    claimed = [("scheduled", "running")]
    # Steps that return at once run one after another in the held claim.
    assert found[two] == [("scheduled", "completed")]
    assert client.get(two).outputs == {"a": {}, "b": {}}
    # Claimed where a step suspended, its first step's output written with the claim.
    assert found[then_waits] == claimed + [("running", "completed")]
    assert client.get(then_waits).outputs == {"a": {}, "b": {"slept_ms": 20}, "c": {}}
    # A coroutine that suspended went on under a claim, from where it was.
    assert found[suspends] == claimed + [("running", "completed")]
    assert client.get(suspends).outputs == {"a": {"slept_ms": 20}}
    # A plain function never runs held (it runs in a thread), nor does a delay.
    assert found[plain] == claimed + [("running", "failed")]
    assert found[delayed] == claimed + [("running", "scheduled"), ("scheduled", "completed")]
    # A failure that came back at once is written under a claim, as an attempt.
    assert found[raises] == claimed + [("running", "failed")]
    failed = client.get(raises)
    assert (failed.attempt, failed.last_error) == (1, "refused at once")


def test_a_retry_runs_under_a_claim(dsn: str, client: Client) -> None:
    client.create_sequence("one", [{"id": "a", "handler": "noop",
                                    "retry": {"max_attempts": 3}}])
    retried = client.start("one").id
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE instances SET attempt = 1 WHERE id = %s", (retried,))
    run_workers_until(dsn, finished(client, [retried]))
    # Only a first attempt runs held: a handler that killed its process there is charged
    # before its next attempt, which then runs claimed.
    assert paths(dsn)[retried] == [("scheduled", "running"), ("running", "completed")]


def test_keyed_instances_are_left_to_the_keyed_claim(dsn: str, client: Client) -> None:
    client.create_sequence("one", [{"id": "a", "handler": "noop"}])
    keyed = [client.start("one", concurrency_key="k", max_concurrency=1).id
             for _ in range(3)]
    plain = [client.start("one").id for _ in range(3)]
    run_workers_until(dsn, finished(client, keyed + plain))
    found = paths(dsn)
    assert all(found[i] == [("scheduled", "completed")] for i in plain)
    # Seated into the key's slot one at a time (parked meanwhile, never in a held claim).
    for instance_id in keyed:
        assert found[instance_id][-2:] == [("scheduled", "running"), ("running", "completed")]


def test_a_held_claim_that_does_not_commit_recorded_nothing(dsn: str, client: Client) -> None:
    client.create_sequence("counted", [{"id": "a", "handler": "held_counted",
                                        "params": {"dsn": dsn}}])
    RUNS.clear()
    instance_id = client.start("counted").id
    run_workers_until(dsn, finished(client, [instance_id]))
    # The first run's session ended before its commit: nothing of it was written, and
    # the instance was run again, at least once, and recorded once.
    assert RUNS[str(instance_id)] == 2
    assert paths(dsn)[instance_id] == [("scheduled", "completed")]
    done = client.get(instance_id)
    assert done.outputs == {"a": {"runs": 2}} and done.attempt == 0


async def hold_as_a_worker(conn: psycopg.AsyncConnection[Any], instance_id: uuid.UUID,
                           owner: Owner, stack: AsyncExitStack
                           ) -> Callable[[], Awaitable[Any]]:
    """A held claim as a worker sends it (pipeline mode: BEGIN, the lock, a sync), left
    open: the worker froze before its write. Return what it sends once it thaws."""
    pipeline = await stack.enter_async_context(wire.Pipeline(conn))
    lock = claims.lock_due(pipeline, owner, 10)
    await pipeline.sync()
    assert [c.id for c in claims.locked(pipeline, lock)[0]] == [instance_id]
    pipeline.send(b"SELECT 1")
    return pipeline.sync


async def hold_in_a_plain_transaction(conn: psycopg.AsyncConnection[Any],
                                      instance_id: uuid.UUID, owner: Owner,
                                      stack: AsyncExitStack) -> Callable[[], Awaitable[Any]]:
    await conn.execute("BEGIN")
    await conn.execute("SELECT id FROM instances WHERE id = %s FOR UPDATE", (instance_id,))
    return lambda: conn.execute("SELECT 1")


@pytest.mark.parametrize("hold", [hold_as_a_worker, hold_in_a_plain_transaction])
def test_the_sweep_ends_a_dead_nodes_worker_sessions(dsn: str, client: Client, hold: Any
                                                    ) -> None:
    client.create_sequence("one", [{"id": "a", "handler": "noop"}])
    instance_id = client.start("one").id
    frozen = uuid.uuid4()
    stack = AsyncExitStack()

    async def frozen_worker() -> Callable[[], Awaitable[Any]]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await nodes.register(conn, "frozen", frozen, "host", 1, 2, 60, lambda h: False)
        holder = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=nodes.worker_session(frozen))
        stack.push_async_callback(holder.close)
        owner = Owner("frozen", frozen, 0)
        return await hold(holder, instance_id, owner, stack)  # type: ignore[no-any-return]

    # A frozen worker, in the middle of a held claim: its row stays locked.
    loop = asyncio.new_event_loop()
    try:
        thawed = loop.run_until_complete(frozen_worker())
        skip_locked = "SELECT id FROM instances FOR UPDATE SKIP LOCKED"
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute(skip_locked).fetchall() == []
            assert nodes.sweep_stale(60).run(conn).ended == 0  # not stale yet: left alone
            conn.execute("UPDATE cluster_nodes "
                         "SET last_heartbeat = now() - interval '2 minutes'")
            sweep = nodes.sweep_stale(60).run(conn)
            assert (sweep.dead, sweep.ended) == (("frozen",), 1)
            with conn.transaction():
                assert conn.execute(skip_locked).fetchall() == [(instance_id,)]
        with pytest.raises(psycopg.OperationalError):
            loop.run_until_complete(thawed())
    finally:
        with contextlib.suppress(psycopg.Error):
            loop.run_until_complete(stack.aclose())
        loop.close()


# The chain of held claims (`Executor.run_locked`), driven directly: each held claim's
# write and COMMIT go with the next one's lock, so what a claim hands over must wait for
# its own commit, and a failure must be placed before or after it.

SUSPENDED: list[str] = []  # `held_suspends` calls that were stopped where they suspended


@handler("held_suspends")
async def suspends(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    try:
        await asyncio.sleep(0)
    except GeneratorExit:
        SUSPENDED.append(str(ctx.instance_id))
        raise
    return {}


@contextlib.asynccontextmanager
async def executor_on(dsn: str) -> AsyncIterator[tuple[Executor, psycopg.AsyncConnection[Any]]]:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False,
                                   kwargs={"autocommit": True}) as pool:
        executor = Executor(pool, None, default_registry, WorkerStats(),  # type: ignore[arg-type]
                            ThreadPoolExecutor(1), lambda: False)
        async with pool.connection() as conn:
            yield executor, conn


def claims_of(dsn: str, ids: list[uuid.UUID]) -> list[tuple[str, int]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT state, claim_epoch FROM instances WHERE id = ANY(%s) "
                            "ORDER BY id", (ids,)).fetchall()


def test_held_claims_chain_while_full_batches_come_back(dsn: str, client: Client) -> None:
    client.create_sequence("one", [{"id": "a", "handler": "noop"}])
    ids = [c.id for c in client.start_many([{"sequence": "one"}] * 5)]
    taken: list[list[uuid.UUID]] = []

    async def run() -> Held:
        async with executor_on(dsn) as (executor, conn):
            return await executor.run_locked(
                conn, Owner("test-node", uuid.uuid4(), 0), 2,
                lambda held: 2 if held.full else 0,
                lambda held: taken.append([c.id for c in held.locked]))

    last = asyncio.run(run())
    # Three claims of 2, 2 and 1, each handed over once; the last one, short of its
    # limit, ended the chain.
    assert [len(batch) for batch in taken] == [2, 2, 1]
    assert sorted(i for batch in taken for i in batch) == sorted(ids)
    assert (last.limit, len(last.locked), last.full) == (2, 1, False)
    assert paths(dsn) == {i: [("scheduled", "completed")] for i in ids}


def test_a_row_changed_after_the_locks_snapshot_is_written_where_it_was_locked(
        dsn: str, client: Client) -> None:
    # The held write finds its rows where the lock found them (`Claimed.ctid`). A row
    # another session updated (still due) after the lock's snapshot was taken is locked
    # in its new version: the write must find that version, not the one the snapshot saw.
    client.create_sequence("one", [{"id": "a", "handler": "noop"}])
    instance_id = client.start("one").id
    incarnation = uuid.uuid4()
    taken: list[Held] = []

    async def run() -> tuple[str, str]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await nodes.register(conn, "test-node", incarnation, "host", 1, 1, 60,
                                 lambda h: False)
            # A registration of the node id in flight: the lock's one wait, with its
            # snapshot already taken (`claims.CLAIMER_REPLACED`).
            blocker = await psycopg.AsyncConnection.connect(dsn)
            await blocker.execute("SELECT 1 FROM cluster_nodes WHERE id = 'test-node' "
                                  "FOR UPDATE")
            async with executor_on(dsn) as (executor, held_conn):
                locking = asyncio.create_task(executor.run_locked(
                    held_conn, Owner("test-node", incarnation, 0), 10, lambda held: 0,
                    taken.append))
                waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                           "'Lock' AND datname = current_database() "
                           "AND query LIKE '%claimer AS MATERIALIZED%'")
                while (await (await conn.execute(waiting)).fetchone()) != (1,):
                    await asyncio.sleep(0.01)  # (until the lock waits: a row, polled)
                changed = "UPDATE instances SET updated_at = now() WHERE id = %s RETURNING ctid"
                before = await (await conn.execute("SELECT ctid FROM instances WHERE id = %s",
                                                   (instance_id,))).fetchone()
                after = await (await conn.execute(changed, (instance_id,))).fetchone()
                await blocker.rollback()
                await blocker.close()
                await locking
        assert before is not None and after is not None
        return str(before[0]), str(after[0])

    before, after = asyncio.run(run())
    assert before != after  # (a new row version, elsewhere)
    [held] = taken
    assert [c.ctid for c in held.locked] == [after]
    assert paths(dsn) == {instance_id: [("scheduled", "completed")]}
    assert client.get(instance_id).outputs == {"a": {}}


def test_a_failure_after_a_commit_hands_over_what_it_claimed(dsn: str, client: Client
                                                              ) -> None:
    client.create_sequence("waits", [{"id": "a", "handler": "held_suspends"}])
    ids = sorted(c.id for c in client.start_many([{"sequence": "waits"}] * 2))
    taken: list[Held] = []

    async def run() -> None:
        async with executor_on(dsn) as (executor, conn):
            # The next claim's lock fails (a negative LIMIT) after this one's commit.
            await executor.run_locked(conn, Owner("test-node", uuid.uuid4(), 0), 2,
                                      lambda held: -1, taken.append)

    with pytest.raises(psycopg.DataError):
        asyncio.run(run())
    [held] = taken
    assert sorted(run.claimed.id for run in held.going_on) == ids
    assert all(run.claimed.epoch == 1 for run in held.going_on)  # the claim's own epoch
    assert claims_of(dsn, ids) == [("running", 1), ("running", 1)]
    for run in held.going_on:
        run.pending.close()  # type: ignore[union-attr]


def test_a_failed_write_claims_nothing_and_stops_its_handlers(dsn: str, client: Client
                                                              ) -> None:
    client.create_sequence("waits", [{"id": "a", "handler": "held_suspends"}])
    ids = sorted(c.id for c in client.start_many([{"sequence": "waits"}] * 2))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused'; END $$;
            CREATE TRIGGER test_refuse BEFORE UPDATE ON instances
                FOR EACH ROW EXECUTE FUNCTION test_refuse();""")
    SUSPENDED.clear()
    taken: list[Held] = []

    async def run() -> None:
        async with executor_on(dsn) as (executor, conn):
            await executor.run_locked(conn, Owner("test-node", uuid.uuid4(), 0), 2,
                                      lambda held: 2, taken.append)

    with pytest.raises(psycopg.errors.RaiseException):
        asyncio.run(run())
    # Nothing was handed over or written, and both calls were stopped where they waited.
    assert taken == [] and sorted(SUSPENDED) == sorted(str(i) for i in ids)
    assert claims_of(dsn, ids) == [("scheduled", 0), ("scheduled", 0)]


def test_an_output_already_recorded_costs_one_claim_not_the_instances(dsn: str, client: Client
                                                                        ) -> None:
    # A held run writes its outputs without a conflict check, as no output can be there
    # for a step its instance has not passed. Were one there all the same, that claim
    # records nothing, and the next one takes the same instances and overwrites it.
    client.create_sequence("one", [{"id": "a", "handler": "noop", "params": {"x": 2}}])
    ids = sorted(c.id for c in client.start_many([{"sequence": "one"}] * 3))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO step_outputs (instance_id, step_id, output, attempt) "
                     "VALUES (%s, 'a', '{\"stale\": true}', 1)", (ids[0],))
    owner = Owner("test-node", uuid.uuid4(), 0)

    async def run() -> Held:
        async with executor_on(dsn) as (executor, conn):
            with pytest.raises(HeldConflict):
                await executor.run_locked(conn, owner, 3, lambda held: 0, lambda held: None)
            assert claims_of(dsn, ids) == [("scheduled", 0)] * 3  # nothing was written
            await conn.rollback()  # as the pool does with a worker's connection
            return await executor.run_locked(conn, owner, 3, lambda held: 0,
                                              lambda held: None)

    held = asyncio.run(run())
    assert sorted(c.id for c in held.locked) == ids
    assert claims_of(dsn, ids) == [("completed", 1)] * 3
    assert all(client.get(i).outputs == {"a": {"x": 2}} for i in ids)


def test_a_worker_goes_on_after_a_held_claim_found_an_output_recorded(dsn: str, client: Client
                                                                       ) -> None:
    client.create_sequence("one", [{"id": "a", "handler": "noop", "params": {"x": 3}}])
    ids = [c.id for c in client.start_many([{"sequence": "one"}] * 4)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO step_outputs (instance_id, step_id, output, attempt) "
                     "VALUES (%s, 'a', '{\"stale\": true}', 1)", (ids[1],))
    run_workers_until(dsn, finished(client, ids))
    assert all(client.get(i).outputs == {"a": {"x": 3}} for i in ids)


async def ready_connection(dsn: str) -> tuple[list[str], Any]:
    """Open a worker's pool as its `run` does; from one of its connections, the statements
    its session has prepared, and its transaction status."""
    worker = Worker(FAST, dsn, Owner("test-node", uuid.uuid4(), 0))
    pool = worker.new_pool()
    await pool.open(wait=True, timeout=30)
    try:
        async with pool.connection() as conn:
            status = conn.info.transaction_status
            cursor = await conn.execute("SELECT statement FROM pg_prepared_statements")
            return [row[0] for row in await cursor.fetchall()], status
    finally:
        await pool.close()


def test_a_workers_new_connection_is_made_ready_for_held_claims_and_changes_nothing(
        dsn: str, client: Client) -> None:
    client.create_sequence("one", [{"id": "a", "handler": "noop"}])
    [created] = client.start_many([{"sequence": "one"}])
    prepared, status = asyncio.run(ready_connection(dsn))
    # The held claim's two statements, as its first claim will send them.
    lock = claims.bounded(claims.LOCK_DUE, FAST.batch_size)  # (its bound on its last line)
    assert sum("FOR UPDATE SKIP LOCKED" in text for text in prepared) == 1
    assert any(text.startswith(lock.split("%(")[0])
               and text.rstrip().endswith(lock.rstrip().splitlines()[-1]) for text in prepared)
    assert sum("INSERT INTO step_outputs" in text for text in prepared) == 1
    # Nothing written, nothing left open.
    assert status == psycopg.pq.TransactionStatus.IDLE
    assert claims_of(dsn, [created.id]) == [("scheduled", 0)]
    assert paths(dsn) == {} and client.get(created.id).outputs == {}


def test_a_connection_that_cannot_be_made_ready_is_used_all_the_same(
        dsn: str, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE step_outputs RENAME TO step_outputs_elsewhere")
    prepared, status = asyncio.run(ready_connection(dsn))
    assert not any("INSERT INTO step_outputs" in text for text in prepared)
    assert status == psycopg.pq.TransactionStatus.IDLE
    assert "could not make a new connection ready for claims" in caplog.text
    assert 'relation "step_outputs" does not exist' in caplog.text
