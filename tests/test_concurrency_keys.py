"""Concurrency keys against the real SQL: seating, parking, freeing, waking, the index."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from engine_helpers import finish_steps
from psycopg_pool import AsyncConnectionPool

from orch8 import Client, State
from orch8.store import claims, concurrency, nodes
from orch8.store.claims import Claimed, Owner, StepDone
from orch8.store.concurrency import KeyUsage


def owner(slot: int = 0) -> Owner:
    return Owner("node-a", uuid.uuid4(), slot)


async def _claim(dsn: str, who: Owner, limit: int) -> list[Claimed]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await claims.claim(conn, who, limit)


def claim(dsn: str, limit: int, who: Owner | None = None) -> list[Claimed]:
    return asyncio.run(_claim(dsn, who or owner(), limit))


def write(dsn: str, function: Any, *args: Any) -> Any:
    """Run one of the async fenced writes of `claims` on its own connection."""

    async def run() -> Any:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await function(conn, *args)

    return asyncio.run(run())


def usage(conn: psycopg.Connection, key: str) -> KeyUsage | None:
    return concurrency.key_usage(key).run(conn)


def finish(dsn: str, claimed: Claimed) -> bool:
    done = StepDone(claimed.id, claimed.epoch, "only", 1, "{}", 1, True)
    return claimed.id in write(dsn, finish_steps, [done])


@pytest.fixture
def client(dsn):
    with Client(dsn) as client:
        client.create_sequence("s", [{"id": "only", "handler": "noop"}])
        yield client


def start(client: Client, key: str | None, cap: int | None, count: int = 1,
          **options: Any) -> list[uuid.UUID]:
    return [client.start("s", concurrency_key=key, max_concurrency=cap, **options).id
            for _ in range(count)]


def test_a_key_runs_at_most_its_max_and_the_rest_wait(client, dsn, conn):
    start(client, "k", 2, count=5)
    claimed = claim(dsn, 10)
    assert len(claimed) == 2
    assert usage(conn, "k") == KeyUsage("k", slots=2, running=2, waiting=3)
    # The waiting ones are out of the claim index: another claim finds nothing at all.
    assert claim(dsn, 10) == []


def test_a_saturated_key_does_not_hold_back_other_work(client, dsn, conn):
    start(client, "hot", 1, count=40, priority="critical")
    plain = set(start(client, None, None, count=5, priority="low"))
    first = claim(dsn, 5)
    second = claim(dsn, 5)
    got = {c.id for c in first + second}
    assert plain <= got, "unkeyed work waited behind a saturated key"
    assert usage(conn, "hot") == KeyUsage("hot", slots=1, running=1, waiting=39)


def test_each_waiter_is_parked_once_and_then_never_read_again(client, dsn, conn):
    start(client, "k", 1, count=30)

    async def rounds() -> list[tuple[int, int]]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            seen = []
            for _ in range(4):
                taken, parked = await claims._claim_round(aconn, owner(), 10)
                seen.append((len(taken), parked))
            return seen

    # 1 seated; the other 29 parked at once (the key is proven full); nothing left to read.
    assert asyncio.run(rounds()) == [(1, 29), (0, 0), (0, 0), (0, 0)]


def test_a_freed_slot_goes_to_the_next_waiter_by_priority_then_due_time(client, dsn, conn):
    [first] = start(client, "k", 1, priority="critical")
    [low] = start(client, "k", 1, priority="low")
    [high_old] = start(client, "k", 1, priority="high")
    [high_new] = start(client, "k", 1, priority="high")
    conn.execute("UPDATE instances SET next_fire_at = now() - interval '1 minute' "
                 "WHERE id = %s", (high_old,))
    order = []
    [running] = claim(dsn, 10)
    while running:
        order.append(running.id)
        assert finish(dsn, running)
        got = claim(dsn, 10)
        assert len(got) <= 1
        running = got[0] if got else None
    assert order == [first, high_old, high_new, low]


def stale_sweep(dsn: str, conn: psycopg.Connection, client: Client, running: Claimed,
                who: Owner) -> None:
    """The owner's node stops heartbeating; another node's stale sweep releases its claims."""
    conn.execute("""
        INSERT INTO cluster_nodes (id, incarnation, hostname, pid, workers, last_heartbeat)
        VALUES (%s, %s, 'h', 1, 1, now() - interval '1 hour')""",
                 (who.node_id, who.incarnation))
    assert nodes.sweep_stale(60.0).run(conn).released == 1


# Every way an instance leaves `running`: (dsn, conn, client, claimed, owner) -> None.
EXITS: dict[str, Any] = {
    "complete": lambda dsn, conn, client, c, who: finish(dsn, c),
    "fail": lambda dsn, conn, client, c, who: write(dsn, claims.fail, c, "boom"),
    "retry_later": lambda dsn, conn, client, c, who: write(
        dsn, claims.retry_later, c, "boom", 60_000),
    "wait": lambda dsn, conn, client, c, who: write(dsn, claims.wait, c, 60_000),
    "release_unstarted": lambda dsn, conn, client, c, who: write(
        dsn, claims.release_unstarted, [c]),
    "release_owner": lambda dsn, conn, client, c, who: claims.release_owner(
        conn, who.incarnation),
    "cancel": lambda dsn, conn, client, c, who: client.cancel(c.id),
    "stale_sweep": stale_sweep,
    "delete": lambda dsn, conn, client, c, who: conn.execute(
        "DELETE FROM instances WHERE id = %s", (c.id,)),
}


@pytest.mark.parametrize("exit_path", sorted(EXITS))
def test_every_way_out_of_running_frees_the_slot_and_wakes_a_waiter(
        client, dsn, conn, exit_path):
    start(client, "k", 1, count=2)
    who = owner()
    [running] = claim(dsn, 10, who)
    assert usage(conn, "k") == KeyUsage("k", slots=1, running=1, waiting=1)
    EXITS[exit_path](dsn, conn, client, running, who)
    assert client.list(state=State.RUNNING) == []
    state = usage(conn, "k")
    assert state is not None and state.running == 0 and state.waiting == 0
    # The woken waiter (or the released instance itself) is claimable at once, by another
    # node: after the stale sweep, node-a is registered dead and may claim no more.
    [again] = claim(dsn, 10, Owner("node-b", uuid.uuid4(), 0))
    assert usage(conn, "k").running == 1  # type: ignore[union-attr]
    if exit_path not in ("release_unstarted", "release_owner", "stale_sweep"):
        assert again.id != running.id


def test_a_lost_claim_frees_nothing_twice(client, dsn, conn):
    start(client, "k", 1, count=2)
    who = owner()
    [running] = claim(dsn, 10, who)
    claims.release_owner(conn, who.incarnation)
    [again] = claim(dsn, 10)
    # The first owner's late writes are refused and leave the new holder's slot alone.
    assert not finish(dsn, running)
    assert not write(dsn, claims.fail, running, "late")
    assert usage(conn, "k") == KeyUsage("k", slots=1, running=1, waiting=1)
    assert client.get(again.id).state == State.RUNNING


def test_a_keyed_instance_cannot_run_without_a_slot(client, conn):
    [instance] = start(client, "k", 1)
    with pytest.raises(psycopg.errors.RaiseException, match="without a slot"):
        conn.execute("UPDATE instances SET state = 'running' WHERE id = %s", (instance,))


def test_an_instance_takes_only_slots_up_to_its_own_max(client, dsn, conn):
    # Two instances allowing 3 take slots 1 and 2; one allowing 1 must then wait for
    # slot 1 even though only 2 of 3 slots are held. The one allowing 3 still fits.
    wide = start(client, "k", 3, count=2)
    assert {c.id for c in claim(dsn, 10)} == set(wide)
    [narrow] = start(client, "k", 1)
    [third] = start(client, "k", 3)
    assert [c.id for c in claim(dsn, 10)] == [third]
    assert client.get(narrow).state == State.SCHEDULED
    assert usage(conn, "k") == KeyUsage("k", slots=3, running=3, waiting=1)
    # Slot 1 frees: the narrow one is the waiter that can use it.
    holder = conn.execute("SELECT instance_id FROM concurrency_slots "
                          "WHERE concurrency_key = 'k' AND slot = 1").fetchone()[0]
    client.cancel(holder)
    assert [c.id for c in claim(dsn, 10)] == [narrow]


def test_the_backstop_wakes_a_waiter_left_behind_a_free_slot(client, dsn, conn):
    start(client, "k", 1, count=3)
    [running] = claim(dsn, 10)
    # Free the slot behind the triggers' back: the state a lost wake-up would leave.
    conn.execute("SET session_replication_role = replica")
    conn.execute("UPDATE instances SET state = 'completed' WHERE id = %s", (running.id,))
    conn.execute("UPDATE concurrency_slots SET instance_id = NULL")
    conn.execute("SET session_replication_role = DEFAULT")
    assert claim(dsn, 10) == []
    assert asyncio.run(backstop_once(dsn)) == 1
    assert len(claim(dsn, 10)) == 1
    assert asyncio.run(backstop_once(dsn)) == 0


async def backstop_once(dsn):
    """One round of the workers' backstop, on a pool of its own."""
    async with AsyncConnectionPool(dsn, min_size=1, max_size=1,
                                   kwargs={"autocommit": True}) as pool:
        return await concurrency.SlotBackstop(pool).run_once()


def test_queue_depth_counts_instances_waiting_for_a_slot(client, dsn, conn):
    start(client, "k", 1, count=5, priority="high")
    start(client, None, None, count=2)
    start(client, None, None, count=3, priority="low", delay_ms=60_000)  # not due
    assert len(claim(dsn, 10)) == 3  # one of the key, the two unkeyed
    assert usage(conn, "k").waiting == 4  # type: ignore[union-attr]
    assert client.queue_depth() == {"low": 0, "normal": 0, "high": 4, "critical": 0,
                                    "total": 4}
