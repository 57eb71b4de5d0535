"""The engine end to end: real workers, real PostgreSQL, handlers from tests/handlers_core."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid

import psycopg
import pytest

import tests.handlers_core  # noqa: F401  (registers test handlers)
from orch8 import Client, State
from orch8.config import Settings
from orch8.engine.worker import Worker
from orch8.handlers import default_registry
from orch8.store.claims import Owner
from tests.engine_helpers import FAST, LISTENERS, run_workers_until, wait_for_listeners


@pytest.fixture
def client(dsn):
    with Client(dsn) as client:
        yield client


def finished(client, *ids):
    return lambda: all(client.get(i).state in (State.COMPLETED, State.FAILED, State.CANCELLED)
                       for i in ids)


def test_steps_run_in_order_and_see_earlier_outputs(dsn, client):
    client.create_sequence("ctx", [
        {"id": "first", "handler": "noop", "params": {"greeting": "hi"}},
        {"id": "second", "handler": "test_context"},
        {"id": "third", "handler": "log",
         "params": {"message": "{{ input.who }}: {{ steps.first.greeting }}"}},
    ])
    created = client.start("ctx", {"who": "ada"})
    run_workers_until(dsn, finished(client, created.id))
    done = client.get(created.id)
    assert done.state == State.COMPLETED
    assert done.finished_at is not None
    assert done.outputs["second"] == {
        "input": {"who": "ada"}, "steps": {"first": {"greeting": "hi"}}, "attempt": 1,
        "step_id": "second", "sequence": "ctx"}
    assert done.outputs["third"] == {"message": "ada: hi"}


def test_retries_with_backoff_then_succeeds(dsn, client):
    retry = {"max_attempts": 3, "initial_backoff_ms": 50, "max_backoff_ms": 100}
    client.create_sequence("flaky", [{"id": "s", "handler": "test_flaky",
                                      "params": {"failures": 2}, "retry": retry}])
    created = client.start("flaky")
    run_workers_until(dsn, finished(client, created.id))
    done = client.get(created.id)
    assert done.state == State.COMPLETED
    assert done.outputs["s"] == {"attempt": 3, "calls": 3}
    assert done.last_error == "RuntimeError: boom 2"


def test_exhausted_retries_go_to_the_dead_letter(dsn, client):
    retry = {"max_attempts": 2, "initial_backoff_ms": 10, "max_backoff_ms": 10}
    client.create_sequence("doomed", [{"id": "s", "handler": "test_flaky",
                                       "params": {"failures": 99}, "retry": retry}])
    created = client.start("doomed")
    run_workers_until(dsn, finished(client, created.id))
    done = client.get(created.id)
    assert done.state == State.FAILED
    assert done.attempt == 2
    assert done.last_error == "RuntimeError: boom 2"
    assert [i.id for i in client.list(state=State.FAILED)] == [created.id]
    # Retrying from the dead letter runs the step again with a fresh attempt count.
    client.retry(created.id)
    assert client.get(created.id).state == State.SCHEDULED
    assert client.get(created.id).attempt == 0


def test_non_retryable_error_fails_at_once(dsn, client):
    client.create_sequence("fatal", [{"id": "s", "handler": "test_fatal",
                                      "retry": {"max_attempts": 5, "initial_backoff_ms": 10}}])
    created = client.start("fatal")
    run_workers_until(dsn, finished(client, created.id))
    done = client.get(created.id)
    assert (done.state, done.attempt, done.last_error) == (State.FAILED, 1, "card declined")


def unknown_handler_error() -> str:
    # The modules are those of this process's registry: the built-ins, tests.handlers_core,
    # and whatever other test modules imported before this test have registered.
    loaded = default_registry.modules()
    assert "orch8.handlers.builtin" in loaded and "tests.handlers_core" in loaded
    return (f"unknown handler 'no_such_handler' (this node loaded: {', '.join(loaded)}; "
            "set ORCH8_HANDLERS to the module that defines it)")


@pytest.mark.parametrize("handler, error", [
    ("no_such_handler", None),
    ("test_not_a_dict", "handler returned list, not a dict"),
])
def test_handler_mistakes_fail_the_instance_not_the_worker(dsn, client, handler, error):
    error = error or unknown_handler_error()
    client.create_sequence("broken", [{"id": "s", "handler": handler,
                                       "retry": {"max_attempts": 3, "initial_backoff_ms": 10}}])
    bad = client.start("broken")
    client.create_sequence("fine", [{"id": "s", "handler": "noop"}])
    good = client.start("fine")
    run_workers_until(dsn, finished(client, bad.id, good.id))
    assert client.get(bad.id).state == State.FAILED
    assert client.get(bad.id).last_error == error
    assert client.get(good.id).state == State.COMPLETED


def test_an_unknown_handler_is_logged_once_per_name_not_per_instance(dsn, client, caplog):
    client.create_sequence("typo", [{"id": "s", "handler": "sned_email"}])
    client.create_sequence("typo2", [{"id": "s", "handler": "chrage_card"}])
    created = [client.start("typo") for _ in range(5)] + [client.start("typo2")]
    with caplog.at_level("WARNING", logger="orch8.handlers"):
        run_workers_until(dsn, finished(client, *(c.id for c in created)))
    assert {client.get(c.id).state for c in created} == {State.FAILED}
    warned = [r.getMessage() for r in caplog.records if "unknown handler" in r.getMessage()]
    # Earlier tests in this process may already have reported other names; these two are new.
    assert sorted(m.split("'")[1] for m in warned) == ["chrage_card", "sned_email"]


def test_step_timeout_is_a_retryable_failure(dsn, client):
    client.create_sequence("slow", [{
        "id": "s", "handler": "sleep", "params": {"ms": 2000}, "timeout_ms": 50,
        "retry": {"max_attempts": 2, "initial_backoff_ms": 10, "max_backoff_ms": 10}}])
    created = client.start("slow")
    run_workers_until(dsn, finished(client, created.id))
    done = client.get(created.id)
    assert (done.state, done.attempt) == (State.FAILED, 2)
    assert done.last_error == "step s timed out after 50 ms"


def test_delay_is_durable_and_measured_by_the_database(dsn, client, conn):
    client.create_sequence("wait", [{"id": "a", "handler": "noop"},
                                    {"id": "b", "handler": "noop", "delay_ms": 400}])
    created = client.start("wait")
    # Run until the instance is parked on its delay, then stop the worker: the wait
    # survives in the database with no process holding it.
    run_workers_until(dsn, lambda: conn.execute(
        "SELECT delay_done FROM instances WHERE id = %s", (created.id,)).fetchone()[0])
    parked = client.get(created.id)
    assert parked.state == State.SCHEDULED and parked.step_index == 1
    run_workers_until(dsn, finished(client, created.id))
    waited = conn.execute(
        "SELECT (i.finished_at - o.created_at) >= interval '400 milliseconds' "
        "FROM instances i JOIN step_outputs o ON o.instance_id = i.id AND o.step_id = 'a' "
        "WHERE i.id = %s", (created.id,)).fetchone()[0]
    assert waited is True
    assert client.get(created.id).state == State.COMPLETED


def test_sync_handlers_run_in_threads_and_async_on_the_loop(dsn, client):
    client.create_sequence("threads", [{"id": "s", "handler": "test_thread_name"}])
    created = client.start("threads")
    run_workers_until(dsn, finished(client, created.id))
    assert client.get(created.id).outputs["s"]["thread"].startswith("orch8-handler")


def test_idempotency_key_returns_the_first_instance(client):
    client.create_sequence("once", [{"id": "s", "handler": "noop"}])
    first = client.start("once", {"n": 1}, idempotency_key="order-42")
    second = client.start("once", {"n": 2}, idempotency_key="order-42")
    assert (second.id, first.deduplicated, second.deduplicated) == (first.id, False, True)
    assert client.get(first.id).input == {"n": 1}
    assert len(client.list()) == 1


def test_cancel_while_running_fences_the_late_outcome(dsn, client):
    client.create_sequence("long", [{"id": "s", "handler": "sleep", "params": {"ms": 600}},
                                    {"id": "t", "handler": "noop"}])
    created = client.start("long")

    def cancel_once_running():
        if client.get(created.id).state == State.RUNNING:
            client.cancel(created.id)
            return True
        return False

    workers = run_workers_until(dsn, cancel_once_running)
    done = client.get(created.id)
    assert done.state == State.CANCELLED
    assert done.outputs == {}  # the step finished after the cancel; its outcome was refused
    assert workers[0].stats.counts["fenced_rejected"] == 1
    with pytest.raises(Exception, match="cannot cancel an instance that is cancelled"):
        client.cancel(created.id)


def test_graceful_stop_finishes_the_step_in_flight_and_releases_the_rest(dsn, client):
    client.create_sequence("two", [{"id": "a", "handler": "sleep", "params": {"ms": 300}},
                                   {"id": "b", "handler": "noop"}])
    created = client.start("two")
    run_workers_until(dsn, lambda: client.get(created.id).state == State.RUNNING)
    after = client.get(created.id)
    assert after.state == State.SCHEDULED  # released for another node to continue
    assert after.step_index == 1 and list(after.outputs) == ["a"]
    assert after.claimed_by is None


def test_hurry_cancels_and_releases_in_flight_work(dsn, client):
    client.create_sequence("stuck", [{"id": "a", "handler": "sleep", "params": {"ms": 30000}}])
    created = client.start("stuck")

    async def main():
        stop = asyncio.Event()
        worker = Worker(FAST, dsn, Owner("n", uuid.uuid4(), 0))
        task = asyncio.create_task(worker.run(stop))
        while await asyncio.to_thread(lambda: client.get(created.id).state) != State.RUNNING:
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.sleep(0.2)
        worker.hurry()
        await asyncio.wait_for(task, 5)
        return worker

    worker = asyncio.run(main())
    assert client.get(created.id).state == State.SCHEDULED
    assert worker.stats.counts["released"] == 1


def test_enqueue_joins_the_callers_transaction(dsn, client):
    import psycopg

    from orch8 import enqueue

    client.create_sequence("tx", [{"id": "s", "handler": "noop"}])
    with psycopg.connect(dsn) as conn:
        enqueue(conn, "tx", {"order": 1})
        conn.rollback()
        kept = enqueue(conn, "tx", {"order": 2})
        conn.commit()
    assert [i.id for i in client.list()] == [kept.id]


def test_enqueue_many_joins_the_callers_transaction_and_fails_alone(dsn, client):
    import psycopg

    from orch8 import enqueue, enqueue_many
    from orch8.errors import NotFound

    client.create_sequence("txm", [{"id": "s", "handler": "noop"}])
    with psycopg.connect(dsn) as conn:
        enqueue_many(conn, [{"sequence": "txm", "input": {"n": n}} for n in range(3)])
        conn.rollback()
        before = enqueue(conn, "txm", {"n": "before"})
        # One unknown sequence: none of the batch, and the transaction goes on.
        with pytest.raises(NotFound):
            enqueue_many(conn, [{"sequence": "txm"}, {"sequence": "no-such"}])
        kept = enqueue_many(conn, [{"sequence": "txm", "input": {"n": n}} for n in range(3)])
        conn.commit()
    assert {i.id for i in client.list()} == {before.id} | {created.id for created in kept}
    assert sorted(client.get(created.id).input["n"] for created in kept) == [0, 1, 2]


def test_enqueue_many_on_an_autocommit_connection_is_all_or_nothing(dsn, client):
    import psycopg

    from orch8 import enqueue_many
    from orch8.errors import NotFound

    client.create_sequence("txa", [{"id": "s", "handler": "noop"}])
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(NotFound):
            enqueue_many(conn, [{"sequence": "txa"}, {"sequence": "no-such"}])
        assert client.list() == []
        created = enqueue_many(conn, [{"sequence": "txa"}] * 2)
    assert {i.id for i in client.list()} == {c.id for c in created}


def test_a_starting_worker_listens_before_its_first_claim(dsn, client):
    # Work committed after the first claim began must find the worker listening: else
    # its NOTIFY is lost, and it waits for the next tick (5 s here).
    client.create_sequence("first", [{"id": "s", "handler": "noop"}])
    first = client.start("first").id
    slow_ticks = Settings(tick_interval_ms=5000, commit_linger_ms=0.0)
    seen = {}

    def first_claimed() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            listen = conn.execute(f"SELECT query_start {LISTENERS}").fetchone()
            claim = conn.execute("SELECT claimed_at FROM instances WHERE id = %s AND "
                                 "state = 'completed'", (first,)).fetchone()
        if listen and claim:
            seen.update(listen=listen[0], claim=claim[0])
        return bool(seen)

    run_workers_until(dsn, first_claimed, settings=slow_ticks, timeout_s=4.0)
    # `claimed_at` is the claim's transaction start: the LISTEN was sent before it.
    assert seen["listen"] < seen["claim"]


def test_a_notify_wakes_an_idle_worker_before_the_next_tick(dsn, client):
    client.create_sequence("wake", [{"id": "s", "handler": "noop"}])
    slow_ticks = Settings(tick_interval_ms=5000, commit_linger_ms=0.0)
    first = client.start("wake").id
    box = {}

    def start_later():
        # Once the instance there before the worker has completed, the first claim is
        # behind it, made while it listened. Only a NOTIFY now wakes it before its next
        # tick, 5 s away.
        while client.get(first).state != State.COMPLETED:
            time.sleep(0.01)
        box["id"] = client.start("wake").id
        box["at"] = time.monotonic()

    threading.Thread(target=start_later).start()
    run_workers_until(dsn, lambda: "id" in box and client.get(box["id"]).state == State.COMPLETED,
                      settings=slow_ticks, timeout_s=4.0)
    assert time.monotonic() - box["at"] < 4.0


def test_outcome_survives_the_database_dropping_the_workers_connections(dsn, client):
    import psycopg

    client.create_sequence("outage", [{"id": "a", "handler": "sleep", "params": {"ms": 500}},
                                      {"id": "b", "handler": "noop"}])
    created = client.start("outage")
    client.close()  # the test watches with connections of its own, opened per check

    def state() -> str:
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT state FROM instances WHERE id = %s",
                                (created.id,)).fetchone()[0]

    killed = {}

    def kill_then_wait() -> bool:
        if not killed and state() == "running":
            with psycopg.connect(dsn, autocommit=True) as conn:
                killed["n"] = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        return bool(killed) and state() == "completed"

    run_workers_until(dsn, kill_then_wait)
    assert killed["n"] >= 2  # the pool's connections and the LISTEN connection
    with psycopg.connect(dsn) as conn:
        outputs = conn.execute("SELECT step_id FROM step_outputs WHERE instance_id = %s "
                               "ORDER BY step_id", (created.id,)).fetchall()
    assert [row[0] for row in outputs] == ["a", "b"]


# What a claim sets, as if this worker's claim had committed and its reply had been lost.
LOST_CLAIM = """
UPDATE instances SET state = 'running', claimed_by = 'test-node', claim_incarnation = %s,
    claimed_slot = 0, claimed_at = now() - %s * interval '1 second',
    claim_epoch = claim_epoch + 1
WHERE id = ANY(%s)
"""


def test_a_claim_whose_reply_was_lost_is_given_back_and_run(dsn, client):
    import psycopg

    client.create_sequence("lost", [{"id": "a", "handler": "noop"}])
    lost = [c.id for c in client.start_many([{"sequence": "lost", "delay_ms": 3_600_000}] * 3)]
    earlier = client.start("lost", delay_ms=3_600_000).id
    incarnation = uuid.uuid4()

    def rows() -> dict[uuid.UUID, tuple[str, int, uuid.UUID | None]]:
        with psycopg.connect(dsn) as conn:
            found = conn.execute("SELECT id, state, claim_epoch, claim_incarnation "
                                 "FROM instances WHERE sequence_name = 'lost'").fetchall()
        return {row[0]: row[1:] for row in found}

    async def main() -> None:
        stop = asyncio.Event()
        worker = Worker(FAST, dsn, Owner("test-node", incarnation, 0))
        task = asyncio.create_task(worker.run(stop))
        try:
            await asyncio.to_thread(wait_for_listeners, dsn, 1)
            with psycopg.connect(dsn, autocommit=True) as conn:
                # This worker's claim, committed, its reply lost; and a claim of the same
                # slot by the process before this one (an hour ago), which is not its own.
                conn.execute(LOST_CLAIM, (incarnation, 0, lost))
                conn.execute(LOST_CLAIM, (incarnation, 3600, [earlier]))
                # Drop the worker's connections: its next claim fails, as the lost one did.
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                conn.execute("UPDATE instances SET next_fire_at = now() WHERE id = ANY(%s)",
                             (lost,))
            deadline = time.monotonic() + 20
            while not all(rows()[i][0] == "completed" for i in lost):
                assert time.monotonic() < deadline, f"lost claims never given back: {rows()}"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task

    asyncio.run(main())
    found = rows()
    # Given back (the epoch rose, so a late write under the lost claim is refused), then
    # claimed again and run.
    assert all(found[i][0] == "completed" and found[i][1] >= 3 for i in lost)
    # The earlier process's claim is left for the supervisor to settle.
    assert found[earlier] == ("running", 1, incarnation)


BATCHES = dataclasses.replace(FAST, batch_size=20, max_in_flight=40)
SUSPENDS = {"handler": "sleep", "params": {"ms": 1}}


def test_with_a_backlog_a_worker_claims_its_next_batches_with_its_writes(dsn, client):
    import psycopg

    # A step that suspends, so that its batch goes on under a claim and its outcomes
    # reach the committer (steps that return at once finish inside their held claim).
    client.create_sequence("backlog", [SUSPENDS | {"id": "a"}])
    created = [c.id for c in client.start_many([{"sequence": "backlog"}] * 400)]
    [worker] = run_workers_until(dsn, finished(client, *created), settings=BATCHES)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT state, claim_epoch, count(*) FROM instances "
                            "GROUP BY 1, 2").fetchall()
        outputs = conn.execute("SELECT count(*) FROM step_outputs").fetchone()[0]
    # Each claimed once (epoch 1), completed, its output recorded.
    assert rows == [("completed", 1, 400)]
    assert outputs == 400
    counts = worker.stats.counts
    assert counts["claimed"] == 400 and counts["fenced_rejected"] == 0
    # Most instances came with a write that recorded others. Not all: a suspended step
    # is written when it returns, and a write that frees less than half a batch of slots
    # claims nothing (the claim loop takes those slots).
    assert counts["claimed_with_finish"] > 400 // 2, counts


# Steps that return at once run in held claims (a drop ends the transaction: nothing of
# it was written); steps that suspend go on under claims and their writes claim too.
@pytest.mark.parametrize("step", [{"handler": "noop"}, SUSPENDS], ids=["held", "claimed"])
def test_a_backlog_survives_the_database_dropping_connections_mid_write(dsn, client, step):
    import psycopg

    client.create_sequence("dropped", [step | {"id": "a"}, step | {"id": "b"}])
    created = [c.id for c in client.start_many([{"sequence": "dropped"}] * 600)]
    client.close()
    drops: list[int] = []

    def drop_at_thresholds() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            completed = conn.execute(
                "SELECT count(*) FROM instances WHERE state = 'completed'").fetchone()[0]
            # Whatever each connection is doing then: a claim, a write that also claims,
            # a plain write. Each drop may lose a reply after its commit.
            if len(drops) < 3 and completed >= 100 * (len(drops) + 1):
                drops.append(conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()[0])
        return completed == len(created)

    [worker] = run_workers_until(dsn, drop_at_thresholds, settings=BATCHES, timeout_s=60)
    assert len(drops) == 3 and all(drops)
    with psycopg.connect(dsn) as conn:
        states = conn.execute("SELECT state, count(*) FROM instances GROUP BY 1").fetchall()
        outputs = conn.execute("SELECT step_id, count(*) FROM step_outputs "
                               "GROUP BY 1 ORDER BY 1").fetchall()
    assert states == [("completed", 600)]
    assert outputs == [("a", 600), ("b", 600)]
    if step is SUSPENDS:
        assert worker.stats.counts["claimed_with_finish"] > 0
