"""What the schema still guarantees after its per-row key checks were dropped (migration
004): outputs go with their instance, definitions are never deleted, ids sort by time."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from orch8 import Client
from orch8.ids import uuid7, uuid7_many


def outputs_of(conn: psycopg.Connection, instance_id: uuid.UUID) -> int:
    row = conn.execute("SELECT count(*) FROM step_outputs WHERE instance_id = %s",
                       (instance_id,)).fetchone()
    return int(row[0]) if row else -1


@pytest.fixture
def two_with_outputs(dsn, conn) -> list[uuid.UUID]:
    with Client(dsn) as client:
        client.create_sequence("s", [{"id": "only", "handler": "noop"}])
        created = client.start_many([{"sequence": "s"}, {"sequence": "s"}])
    ids = [c.id for c in created]
    for instance_id in ids:
        conn.execute("INSERT INTO step_outputs (instance_id, step_id, output, attempt) "
                     "VALUES (%s, 'only', '{}', 1)", (instance_id,))
    return ids


def test_deleting_an_instance_deletes_its_outputs_only(conn, two_with_outputs):
    gone, kept = two_with_outputs
    conn.execute("DELETE FROM instances WHERE id = %s", (gone,))
    assert (outputs_of(conn, gone), outputs_of(conn, kept)) == (0, 1)


def test_truncating_instances_truncates_outputs(conn, two_with_outputs):
    conn.execute("TRUNCATE instances")
    assert conn.execute("SELECT count(*) FROM step_outputs").fetchone() == (0,)


@pytest.mark.parametrize("statement", ["DELETE FROM sequences WHERE name = 's'",
                                       "TRUNCATE sequences CASCADE"])
def test_sequence_definitions_cannot_be_deleted(conn, two_with_outputs, statement):
    with pytest.raises(psycopg.errors.RaiseException, match="never deleted"):
        conn.execute(statement)
    assert conn.execute("SELECT count(*) FROM sequences WHERE name = 's'").fetchone() == (1,)


def test_uuid7_many_gives_distinct_version_7_ids_in_time_order():
    first = uuid7_many(1000)
    later = uuid7()
    assert len(set(first)) == 1000
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in [*first, later])
    # The 48-bit millisecond prefix: one clock read per batch, never behind a later id.
    assert len({u.int >> 80 for u in first}) == 1
    assert first[0].int >> 80 <= later.int >> 80
    # Built without UUID's constructor: each must be the UUID its text reads as, whole.
    for u in first[:10]:
        again = uuid.UUID(str(u))
        assert (u == again, hash(u) == hash(again), u.is_safe) == (True, True, again.is_safe)
