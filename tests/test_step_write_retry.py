"""A step outcome written again applies once: after its reply was lost, it is known as ours;
after PostgreSQL rolled it back to break a deadlock, it goes again at once, claim and all.

The fault suite found the first: PostgreSQL restarted between a group commit's COMMIT and
its reply, the executor wrote the same outcome again, and `step_outputs` was overwritten.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import psycopg
import pytest
from engine_helpers import WAITING_CLAIM, finish_steps
from psycopg_pool import AsyncConnectionPool

from orch8 import Client, State
from orch8.engine.committer import StepCommitter
from orch8.store import claims
from orch8.store.claims import Owner, Refilled, StepDone


def test_a_repeated_step_write_applies_once(dsn: str) -> None:
    with Client(dsn) as client:
        client.create_sequence("two", [{"id": "a", "handler": "noop"},
                                       {"id": "b", "handler": "noop"}])
        created = client.start("two").id

    async def write_twice() -> tuple[set[uuid.UUID], set[uuid.UUID], bool, bool]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            [claimed] = await claims.claim(conn, Owner("n", uuid.uuid4(), 1), 1)
            done = StepDone(claimed.id, claimed.epoch, "a", 1, '{"n": 1}', 1, False)
            first = await finish_steps(conn, [done])
            again = await finish_steps(conn, [done])
            stale = StepDone(claimed.id, claimed.epoch - 1, "a", 1, "{}", 1, False)
            return (first, again, await claims.step_recorded(conn, done),
                    await claims.step_recorded(conn, stale))

    first, again, recorded, stale_recorded = asyncio.run(write_twice())
    assert (first, again) == ({created}, set())
    assert recorded and not stale_recorded
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT step_index, state FROM instances").fetchone()
        outputs = conn.execute("SELECT count(*) FROM step_outputs").fetchone()
    assert row == (1, State.RUNNING.value)
    assert outputs == (1,)


class _Refill:
    """The committer's `Refill` (a worker's part), reduced to a record of its calls."""

    def __init__(self, owner: Owner, limit: int) -> None:
        self.owner = owner
        self.limit = limit
        self.refilled: list[Refilled] = []
        self.lost_writes = 0

    def reserve(self, finishing: Sequence[StepDone]) -> int:
        return self.limit

    def claimed(self, refilled: Refilled, reserved: int) -> None:
        self.refilled.append(refilled)

    def lost(self, reserved: int) -> None:
        self.lost_writes += 1


def test_a_write_rolled_back_to_break_a_deadlock_goes_again_claim_and_all(
        dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    owner = Owner("node-d", uuid.uuid4(), 0)
    with Client(dsn) as client:
        client.create_sequence("one", [{"id": "only", "handler": "noop"}])
        for _ in range(3):
            client.start("one")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO cluster_nodes (id, incarnation, hostname, pid, workers) "
                      "VALUES ('node-d', %s, 'h', 1, 1)", (owner.incarnation,))

    async def deadlocked_write() -> tuple[list[claims.Claimed], set[uuid.UUID], _Refill]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            held = await claims.claim(conn, owner, 2)
        done = [StepDone(c.id, c.epoch, "only", 1, '{"n": 1}', 1, True) for c in held]
        refill = _Refill(owner, 1)
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False,
                                       kwargs={"autocommit": True}) as pool, \
                await psycopg.AsyncConnection.connect(dsn) as other, \
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as probe:
            committer = StepCommitter(pool, refill, 0)
            running = asyncio.create_task(committer.run())
            # The other transaction never checks for a deadlock itself (the write's
            # backend does, after the server's deadlock_timeout), so the write is the victim.
            await other.execute("SET deadlock_timeout = '10min'")
            await other.execute("SELECT 1 FROM instances WHERE id = %s FOR UPDATE", (held[0].id,))
            writing = asyncio.create_task(committer.finish_many(done))
            # A real signal: the write holds the node row (KEY SHARE) and waits for that row.
            while not (await (await probe.execute(WAITING_CLAIM)).fetchone())[0]:  # type: ignore[index]
                assert not writing.done()
                await asyncio.sleep(0.01)
            # Now the other waits for the write: PostgreSQL rolls the write back, which
            # lets this lock through; the write's second sending waits for the commit.
            await other.execute("SELECT 1 FROM cluster_nodes WHERE id = 'node-d' FOR UPDATE")
            await other.commit()
            refused = await writing
            running.cancel()
        return held, refused, refill

    with caplog.at_level(logging.WARNING, logger="orch8.engine.committer"):
        held, refused, refill = asyncio.run(deadlocked_write())
    assert any("rolled back" in r.message and "deadlock detected" in r.message
               for r in caplog.records), caplog.text
    # Nothing refused, no claim taken as unknown, and the claim rode along the second time.
    assert refused == set() and refill.lost_writes == 0
    [refilled] = refill.refilled
    assert len(refilled.claimed) == 1 and refilled.claimed[0].epoch == 1
    with psycopg.connect(dsn) as conn:
        rows = dict(conn.execute("SELECT id, state FROM instances").fetchall())
        outputs = conn.execute("SELECT instance_id, output FROM step_outputs").fetchall()
    assert rows == {held[0].id: "completed", held[1].id: "completed",
                    refilled.claimed[0].id: "running"}
    assert sorted(outputs) == sorted((c.id, {"n": 1}) for c in held)


def test_an_outcome_refused_after_its_caller_was_cancelled_is_still_reported(
        dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # A worker told to stop now cancels the run waiting on its write; the write goes on,
    # and if the fence refuses it, the committer (not the gone caller) says so.
    owner = Owner("node-c", uuid.uuid4(), 0)
    with Client(dsn) as client:
        client.create_sequence("one", [{"id": "only", "handler": "noop"}])
        client.start("one")
    refused_counts: list[int] = []

    async def cancelled_while_refused() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            [claimed] = await claims.claim(conn, owner, 1)
        done = StepDone(claimed.id, claimed.epoch, "only", 1, "{}", 1, True)
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False,
                                       kwargs={"autocommit": True}) as pool, \
                await psycopg.AsyncConnection.connect(dsn) as sweep, \
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as probe:
            committer = StepCommitter(pool, _Refill(owner, 0), 0,
                                      on_refused=refused_counts.append)
            running = asyncio.create_task(committer.run())
            # Another node's sweep takes the claim away; its transaction holds the row.
            await sweep.execute("UPDATE instances SET claim_epoch = claim_epoch + 1, "
                                "state = 'scheduled' WHERE id = %s", (claimed.id,))
            caller = asyncio.create_task(committer.finish_many([done]))
            while not (await (await probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()")).fetchone())[0]:  # type: ignore[index]
                await asyncio.sleep(0.01)
            caller.cancel()
            await sweep.commit()
            await committer.flush()
            running.cancel()
        assert caller.cancelled()

    with caplog.at_level(logging.WARNING, logger="orch8.engine.committer"):
        asyncio.run(cancelled_while_refused())
    assert refused_counts == [1]
    assert any("claim lost before step only was recorded" in r.message
               for r in caplog.records), caplog.text
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM step_outputs").fetchone() == (0,)
