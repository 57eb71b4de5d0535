"""The claim and the fence, against the real SQL."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from engine_helpers import finish_steps
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
