"""The claim and the fence, against the real SQL."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from engine_helpers import WAITING_CLAIM, finish_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch8 import Client, Priority, State
from orch8.store import claims
from orch8.store.claims import Owner, StepDone


def owner(slot: int = 0) -> Owner:
    return Owner("node-a", uuid.uuid4(), slot)


async def claim(dsn: str, who: Owner, limit: int) -> list[claims.Claimed]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await claims.claim(conn, who, limit)


@pytest.fixture
def client(dsn):
    with Client(dsn) as client:
        client.create_sequence("s", [{"id": "only", "handler": "noop"}])
        yield client


def test_claim_takes_higher_priority_first_then_older(client, dsn, conn):
    low = client.start("s", priority="low").id
    normal_old = client.start("s", priority="normal").id
    normal_new = client.start("s", priority="normal").id
    critical = client.start("s", priority="critical").id
    high = client.start("s", priority=Priority.HIGH).id
    conn.execute("UPDATE instances SET next_fire_at = now() - interval '1 minute' WHERE id = %s",
                 (normal_old,))
    order = []
    for _ in range(5):
        order += [c.id for c in asyncio.run(claim(dsn, owner(), 1))]
    assert order == [critical, high, normal_old, normal_new, low]


def test_claim_skips_instances_not_yet_due(client, dsn):
    later = client.start("s", delay_ms=60_000).id
    now = client.start("s").id
    claimed = asyncio.run(claim(dsn, owner(), 10))
    assert [c.id for c in claimed] == [now]
    assert client.get(later).state == State.SCHEDULED


def test_claim_sets_owner_and_bumps_epoch(client, dsn):
    created = client.start("s").id
    who = owner(slot=3)
    [claimed] = asyncio.run(claim(dsn, who, 10))
    row = client.get(created)
    assert (row.state, row.claimed_by, row.claim_epoch) == (State.RUNNING, "node-a", 1)
    assert claimed.epoch == 1


def test_a_write_with_a_stale_epoch_applies_nothing(client, dsn, conn):
    created = client.start("s").id
    who = owner()
    [claimed] = asyncio.run(claim(dsn, who, 10))
    # The node is declared dead: its claims go back with the epoch bumped ...
    assert claims.release_owner(conn, who.incarnation) == 1
    # ... and another node claims the instance.
    [again] = asyncio.run(claim(dsn, owner(), 10))
    assert again.epoch == claimed.epoch + 2  # +1 for the release, +1 for the new claim

    async def late_writes() -> tuple[set[uuid.UUID], bool, bool]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            done = StepDone(claimed.id, claimed.epoch, "only", 1, '{"late": true}', 1, True)
            applied = await finish_steps(aconn, [done])
            failed = await claims.fail(aconn, claimed, "late failure")
            waited = await claims.wait(aconn, claimed, 1000)
            return applied, failed, waited

    assert asyncio.run(late_writes()) == (set(), False, False)
    row = client.get(created)
    assert (row.state, row.outputs, row.last_error) == (State.RUNNING, {}, None)
    assert row.claim_epoch == again.epoch


def test_release_of_one_worker_slot_leaves_the_others(client, dsn, conn):
    for _ in range(4):
        client.start("s")
    incarnation = uuid.uuid4()
    asyncio.run(claim(dsn, Owner("n", incarnation, 0), 2))
    asyncio.run(claim(dsn, Owner("n", incarnation, 1), 2))
    assert claims.release_owner(conn, incarnation, slot=1) == 2
    states = conn.execute("SELECT claimed_slot, state FROM instances ORDER BY 1").fetchall()
    assert sorted(states, key=str) == sorted(
        [(0, "running"), (0, "running"), (None, "scheduled"), (None, "scheduled")], key=str)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    instances=st.integers(min_value=1, max_value=120),
    claimers=st.integers(min_value=2, max_value=6),
    batch=st.integers(min_value=1, max_value=40),
    priorities=st.lists(st.sampled_from(list(Priority)), min_size=1, max_size=4),
)
def test_concurrent_claims_never_overlap_and_lose_nothing(
        dsn, conn, instances, claimers, batch, priorities):
    conn.execute("TRUNCATE instances CASCADE")
    conn.execute("INSERT INTO sequences (name, version, steps) VALUES ('p', 1, '[]') "
                 "ON CONFLICT DO NOTHING")
    conn.execute("""
        INSERT INTO instances (id, sequence_name, sequence_version, priority)
        SELECT gen_random_uuid(), 'p', 1, (%(priorities)s::int[])[1 + g %% %(n)s]
        FROM generate_series(1, %(count)s) AS g""",
                 {"priorities": [int(p) for p in priorities], "n": len(priorities),
                  "count": instances})

    async def drain(who: Owner) -> list[uuid.UUID]:
        got: list[uuid.UUID] = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            while True:
                claimed = await claims.claim(aconn, who, batch)
                if not claimed:
                    return got
                got += [c.id for c in claimed]

    async def race() -> list[list[uuid.UUID]]:
        incarnation = uuid.uuid4()
        return await asyncio.gather(*(drain(Owner("n", incarnation, s)) for s in range(claimers)))

    results = asyncio.run(race())
    every = [i for result in results for i in result]
    assert len(every) == len(set(every)), "an instance was claimed twice"
    assert len(every) == instances, "an instance was never claimed"
    running = conn.execute("SELECT count(*) FROM instances WHERE state = 'running'").fetchone()[0]
    assert running == instances


def one_step_done(claimed: claims.Claimed, epoch: int | None = None) -> StepDone:
    """The only step of `claimed`, done with output {"n": 1}, under `epoch` (its own)."""
    return StepDone(claimed.id, claimed.epoch if epoch is None else epoch, "only", 1,
                    '{"n": 1}', 1, True)


async def finish_and_claim(dsn: str, done: list[StepDone], who: Owner,
                           limit: int) -> claims.Refilled:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await claims.finish_and_claim(conn, done, who, limit)


def test_finish_and_claim_records_under_the_fence_and_claims_the_next_batch(client, dsn, conn):
    who = owner(slot=2)
    first = [client.start("s").id for _ in range(3)]
    low = client.start("s", priority="low").id
    later = [client.start("s").id for _ in range(2)]
    high = client.start("s", priority="high").id
    held = asyncio.run(claim(dsn, who, 4))
    assert {c.id for c in held} == {high, *first}
    # One claim was lost meanwhile (its epoch bumped): its outcome must not apply.
    lost = next(c for c in held if c.id == first[0])
    conn.execute("UPDATE instances SET claim_epoch = claim_epoch + 1 WHERE id = %s", (lost.id,))

    refilled = asyncio.run(finish_and_claim(dsn, [one_step_done(c) for c in held], who, 2))

    assert refilled.refused == {lost.id}
    assert refilled.keyed == 0
    # The next two in claim order (never the low-priority one), claimed as `claim` would.
    assert [c.id for c in refilled.claimed] == later
    assert all(c.epoch == 1 and c.step_index == 0 for c in refilled.claimed)
    rows = dict(conn.execute("SELECT id, state FROM instances").fetchall())
    assert rows == {lost.id: "running", first[1]: "completed", first[2]: "completed",
                    high: "completed", later[0]: "running", later[1]: "running",
                    low: "scheduled"}
    outputs = conn.execute("SELECT instance_id FROM step_outputs").fetchall()
    assert sorted(row[0] for row in outputs) == sorted([first[1], first[2], high])
    claimed_by = conn.execute("SELECT DISTINCT claimed_by, claimed_slot FROM instances "
                              "WHERE id = ANY(%s)", (later,)).fetchall()
    assert claimed_by == [("node-a", 2)]


def test_finish_and_claim_leaves_keyed_candidates_for_the_keyed_claim(client, dsn, conn):
    who = owner()
    plain = client.start("s").id
    [held] = asyncio.run(claim(dsn, who, 1))
    keyed = client.start("s", concurrency_key="k", max_concurrency=1).id
    other = client.start("s").id
    refilled = asyncio.run(finish_and_claim(dsn, [one_step_done(held)], who, 5))
    assert refilled.refused == set()
    assert ([c.id for c in refilled.claimed], refilled.keyed) == ([other], 1)
    assert client.get(plain).state == State.COMPLETED
    # Untouched: neither claimed without a slot nor parked; `claim` seats it next.
    assert (client.get(keyed).state, client.get(keyed).claim_epoch) == (State.SCHEDULED, 0)
    assert [c.id for c in asyncio.run(claim(dsn, who, 5))] == [keyed]


def test_a_replaced_incarnation_neither_records_nor_claims_with_one_statement(client, dsn, conn):
    old = Owner("node-r", uuid.uuid4(), 0)
    conn.execute("INSERT INTO cluster_nodes (id, incarnation, hostname, pid, workers, state) "
                 "VALUES ('node-r', %s, 'h', 1, 1, 'active')", (old.incarnation,))
    client.start("s")
    [held] = asyncio.run(claim(dsn, old, 1))
    waiting = client.start("s").id
    # A new incarnation takes the id over (the row only: its claims stay for the fence test).
    conn.execute("UPDATE cluster_nodes SET incarnation = %s WHERE id = 'node-r'",
                 (uuid.uuid4(),))
    refilled = asyncio.run(finish_and_claim(dsn, [one_step_done(held)], old, 5))
    assert (refilled.refused, refilled.claimed) == ({held.id}, [])
    assert client.get(held.id).state == State.RUNNING
    assert client.get(waiting).state == State.SCHEDULED


def test_finish_and_claim_locks_the_node_row_before_the_rows_it_finishes(client, dsn, conn):
    # The lock order of orch8.store.nodes: a registration locks the node row FOR UPDATE and
    # then releases the previous incarnation's instances. A statement that locked those
    # instances and then waited for the node row would deadlock with it.
    who = Owner("node-l", uuid.uuid4(), 0)
    conn.execute("INSERT INTO cluster_nodes (id, incarnation, hostname, pid, workers, state) "
                 "VALUES ('node-l', %s, 'h', 1, 1, 'active')", (who.incarnation,))
    for _ in range(3):
        client.start("s")
    held = asyncio.run(claim(dsn, who, 3))
    assert len(held) == 3
    with psycopg.connect(dsn) as registering, psycopg.connect(dsn, autocommit=True) as probe:
        registering.execute("SELECT 1 FROM cluster_nodes WHERE id = 'node-l' FOR UPDATE")

        async def blocked_then_done() -> claims.Refilled:
            task = asyncio.create_task(finish_and_claim(
                dsn, [one_step_done(c) for c in held], who, 3))
            # A real signal: the statement waits on a lock (the node row's).
            while not probe.execute(WAITING_CLAIM).fetchone()[0]:
                assert not task.done()
                await asyncio.sleep(0.01)
            # While it waits, it holds none of the rows it finishes: the registration's
            # release could take them all now.
            locked = registering.execute(
                "SELECT count(*) FROM (SELECT id FROM instances WHERE id = ANY(%s) "
                "FOR UPDATE NOWAIT) l", ([c.id for c in held],)).fetchone()[0]
            assert locked == 3
            registering.commit()
            return await task

        refilled = asyncio.run(blocked_then_done())
    assert refilled.refused == set()
    assert all(client.get(c.id).state == State.COMPLETED for c in held)
