"""Property tests of concurrency keys: random interleavings on several real connections.

Each connection is one worker (its own owner). Hypothesis draws a program of actions -
claims, step outcomes (complete, fail, retry, wait, release), a dead owner's release,
cancels, commits - each run on one connection; an action may leave its transaction open
(it then holds its locks while other connections act, as a statement in flight would),
and an action that blocks on such locks waits in the background until they are
committed. After every action, and after a final drain, the committed state must keep
every invariant: per key, never more running than slots or than the cap; a running keyed
instance holds exactly one slot of its key within its own cap; a slot is held only by a
running instance; no claim handed out twice; nothing lost.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from engine_helpers import finish_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch8.store import claims, instances
from orch8.store.claims import Claimed, Owner, StepDone

KINDS = ["claim", "claim", "claim", "complete", "complete", "fail", "retry", "wait",
         "release", "kill", "cancel", "commit"]

action = st.tuples(st.sampled_from(KINDS), st.integers(0, 3), st.integers(0, 50),
                   st.booleans())


@dataclass
class World:
    """The connections, what each owner believes it holds, and every claim handed out."""

    dsn: str
    conns: list[psycopg.AsyncConnection[Any]]
    owners: list[Owner]
    held: list[list[Claimed]]
    open: list[bool]
    blocked: dict[int, asyncio.Task[Any]] = field(default_factory=dict)
    handed_out: dict[uuid.UUID, list[int]] = field(default_factory=dict)


async def run_program(dsn: str, program: list[tuple[str, int, int, bool]],
                      connections: int) -> World:
    conns = [await psycopg.AsyncConnection.connect(dsn) for _ in range(connections)]
    incarnation = uuid.uuid4()
    world = World(dsn, conns, [Owner("n", incarnation, i) for i in range(connections)],
                  [[] for _ in range(connections)], [False] * connections)
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as observer:
            for kind, which, arg, hold in program:
                await step(world, kind, which % connections, arg, hold)
                await check_invariants(observer, world)
            await settle(world)
            await check_invariants(observer, world)
    finally:
        for conn in conns:
            await conn.close()
    return world


async def settle(world: World) -> None:
    """Commit every open transaction, letting each blocked action finish first."""
    while world.blocked or any(world.open):
        for index, task in list(world.blocked.items()):
            if task.done():
                task.result()
                del world.blocked[index]
        for index, is_open in enumerate(world.open):
            if is_open and index not in world.blocked:
                await world.conns[index].commit()
                world.open[index] = False
        if world.blocked:
            await asyncio.wait(set(world.blocked.values()),
                               return_when=asyncio.FIRST_COMPLETED)


async def step(world: World, kind: str, which: int, arg: int, hold: bool) -> None:
    if which in world.blocked:
        await settle(world)
    elif world.open[which]:
        await world.conns[which].commit()  # a statement in flight ends; others stay open
        world.open[which] = False
    if kind == "commit":
        return
    task = asyncio.create_task(act(world, kind, which, arg))
    world.open[which] = True
    done, _ = await asyncio.wait({task}, timeout=0.05)
    if not done:
        world.blocked[which] = task  # waits on locks another open transaction holds
        return
    task.result()
    if not hold:
        await world.conns[which].commit()
        world.open[which] = False


async def act(world: World, kind: str, which: int, arg: int) -> None:
    conn, held = world.conns[which], world.held[which]
    if kind == "claim":
        for claimed in await claims.claim(conn, world.owners[which], 1 + arg % 4):
            world.handed_out.setdefault(claimed.id, []).append(claimed.epoch)
            held.append(claimed)
    elif kind == "kill":
        victim = world.owners[arg % len(world.owners)]
        params = claims.release_owner_params(victim.incarnation, victim.slot)
        await conn.execute(claims.RELEASE_OWNER, params)
    elif kind == "cancel":
        row = await (await conn.execute(
            "SELECT id FROM instances ORDER BY id OFFSET %s LIMIT 1", (arg,))).fetchone()
        if row:
            try:
                await instances.cancel_instance(row[0]).run_async(conn)
            except Exception as error:  # Conflict: already finished
                assert "cannot cancel" in str(error)
    elif held:
        await outcome(conn, kind, held.pop(arg % len(held)))


async def outcome(conn: psycopg.AsyncConnection[Any], kind: str, claimed: Claimed) -> None:
    """One fenced write; a refusal (the claim was lost) is fine, an error is not."""
    if kind == "complete":
        done = StepDone(claimed.id, claimed.epoch, "only", 1, "{}", 1, True)
        await finish_steps(conn, [done])
    elif kind == "fail":
        await claims.fail(conn, claimed, "boom")
    elif kind == "retry":
        await claims.retry_later(conn, claimed, "boom", 0)
    elif kind == "wait":
        await claims.wait(conn, claimed, 0)
    elif kind == "release":
        await claims.release_unstarted(conn, [claimed])


CHECKS = {
    "a running keyed instance without exactly one slot of its key within its cap": """
        SELECT count(*) FROM instances i
        WHERE i.state = 'running' AND i.concurrency_key IS NOT NULL
          AND (SELECT count(*) FROM concurrency_slots s
               WHERE s.instance_id = i.id AND s.concurrency_key = i.concurrency_key
                 AND s.slot <= i.max_concurrency) <> 1""",
    "a slot held by an instance that is not running": """
        SELECT count(*) FROM concurrency_slots s
        LEFT JOIN instances i ON i.id = s.instance_id
        WHERE s.instance_id IS NOT NULL AND (i.id IS NULL OR i.state <> 'running')""",
    # With one cap per key this is "never more running than the cap"; when instances of
    # a key disagree, it holds for every cap m among those with a cap of at most m.
    "a key running more than a cap": """
        SELECT count(*) FROM (
            SELECT DISTINCT concurrency_key, max_concurrency AS cap FROM instances
            WHERE state = 'running' AND concurrency_key IS NOT NULL) c
        WHERE (SELECT count(*) FROM instances i
               WHERE i.concurrency_key = c.concurrency_key AND i.state = 'running'
                 AND i.max_concurrency <= c.cap) > c.cap""",
    "a running instance parked as waiting": """
        SELECT count(*) FROM instances WHERE state = 'running' AND waiting_for_slot""",
}


async def check_invariants(observer: psycopg.AsyncConnection[Any], world: World) -> None:
    for name, sql in CHECKS.items():
        row = await (await observer.execute(sql)).fetchone()  # type: ignore[arg-type]
        assert row is not None and row[0] == 0, name
    for instance_id, epochs in world.handed_out.items():
        assert epochs == sorted(set(epochs)), f"{instance_id} handed out twice: {epochs}"


async def drain(dsn: str, world: World) -> None:
    """The program's owners die; claim and complete until nothing is claimable.

    Only the claim and the triggers are at work here: no backstop, no help.
    """
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        params = claims.release_owner_params(world.owners[0].incarnation, None)
        await conn.execute(claims.RELEASE_OWNER, params)
        who = Owner("drain", uuid.uuid4(), 0)
        while claimed := await claims.claim(conn, who, 50):
            await finish_steps(conn, [
                StepDone(c.id, c.epoch, "only", 1, "{}", 1, True) for c in claimed])


def populate(conn: psycopg.Connection[Any], keys: list[tuple[int, int, int, int]],
             unkeyed: int) -> int:
    """Instances of each key (cap, count, priority seed, other cap for every third one)."""
    conn.execute("TRUNCATE instances, concurrency_slots CASCADE")
    conn.execute("INSERT INTO sequences (name, version, steps) VALUES ('p', 1, '[]') "
                 "ON CONFLICT DO NOTHING")
    total = unkeyed
    for index, (cap, count, priority_seed, other_cap) in enumerate(keys):
        conn.execute("""
            INSERT INTO instances (id, sequence_name, sequence_version, priority,
                                   concurrency_key, max_concurrency)
            SELECT gen_random_uuid(), 'p', 1, (g + %(seed)s) %% 4, %(key)s,
                   CASE WHEN g %% 3 = 0 THEN %(other_cap)s ELSE %(cap)s END
            FROM generate_series(1, %(count)s) AS g""",
                     {"seed": priority_seed, "key": f"key-{index}", "cap": cap,
                      "other_cap": other_cap, "count": count})
        total += count
    conn.execute("INSERT INTO instances (id, sequence_name, sequence_version) "
                 "SELECT gen_random_uuid(), 'p', 1 FROM generate_series(1, %s)", (unkeyed,))
    return total


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    keys=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(0, 3),
                            st.integers(1, 3)),
                  min_size=1, max_size=3),
    unkeyed=st.integers(0, 5),
    connections=st.integers(2, 4),
    program=st.lists(action, min_size=5, max_size=40),
)
def test_random_interleavings_keep_every_invariant(dsn, conn, keys, unkeyed, connections,
                                                  program):
    total = populate(conn, keys, unkeyed)
    world = asyncio.run(run_program(dsn, program, connections))
    asyncio.run(drain(dsn, world))
    states = dict(conn.execute(
        "SELECT state, count(*) FROM instances GROUP BY state").fetchall())
    assert sum(states.values()) == total
    assert states.get("scheduled", 0) == 0 and states.get("running", 0) == 0, (
        f"instances left behind: {states}")
    free = conn.execute("SELECT count(*) FROM concurrency_slots "
                        "WHERE instance_id IS NOT NULL").fetchone()[0]
    assert free == 0, "a slot is still held after everything finished"
