"""A step outcome written again after its reply was lost applies once, and is known as ours.

The fault suite found it: PostgreSQL restarted between a group commit's COMMIT and its reply,
the executor wrote the same outcome again, and `step_outputs` was overwritten.
"""

from __future__ import annotations

import asyncio
import uuid

import psycopg
from engine_helpers import finish_steps

from orch8 import Client, State
from orch8.store import claims
from orch8.store.claims import Owner, StepDone


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
