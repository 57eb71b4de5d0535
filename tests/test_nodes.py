"""`orch8.store.nodes` against the real SQL: registration, heartbeats, drain, the sweep."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from orch8 import Client
from orch8.errors import Conflict
from orch8.store import nodes
from orch8.store.claims import Owner, claim

THRESHOLD_S = 60


def register(conn: psycopg.Connection[Any], node_id: str, host: str = "host",
             holder_gone: Any = lambda holder: False) -> nodes.Registration:
    async def run() -> nodes.Registration:
        async with await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True) as own:
            return await nodes.register(own, node_id, uuid.uuid4(), host, 1, 2, THRESHOLD_S,
                                        holder_gone)

    return asyncio.run(run())


def claim_some(dsn: str, owner: Owner, count: int) -> list[uuid.UUID]:
    """Create `count` instances and claim them as `owner` (a worker would do this)."""
    with Client(dsn) as client:
        client.create_sequence("s", [{"id": "a", "handler": "noop"}])
        client.start_many([{"sequence": "s"} for _ in range(count)])

    async def take() -> list[uuid.UUID]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return [c.id for c in await claim(conn, owner, count)]

    return asyncio.run(take())


def age(conn: psycopg.Connection[Any], node_id: str, seconds: int) -> None:
    conn.execute("UPDATE cluster_nodes SET last_heartbeat = now() - %(s)s * interval '1 second'"
                 " WHERE id = %(id)s", {"s": seconds, "id": node_id})


def running(conn: psycopg.Connection[Any]) -> int:
    return conn.execute("SELECT count(*) FROM instances WHERE state = 'running'").fetchone()[0]


def test_register_then_heartbeat(conn: psycopg.Connection[Any]) -> None:
    registration = register(conn, "n1")
    assert registration.previous_state is None and registration.released == 0
    beat = nodes.heartbeat("n1", registration.incarnation, {"completed": 3}, False).run(conn)
    assert beat == nodes.Beat(alive=True, drain_requested=False)
    stats, state = conn.execute("SELECT stats, state FROM cluster_nodes").fetchone()
    assert stats == {"completed": 3} and state == "active"


def test_heartbeat_of_an_old_incarnation_is_not_alive(conn: psycopg.Connection[Any]) -> None:
    old = register(conn, "n1").incarnation
    age(conn, "n1", THRESHOLD_S)
    new = register(conn, "n1").incarnation
    assert not nodes.heartbeat("n1", old, {}, False).run(conn).alive
    assert nodes.holder("n1").run(conn) == (new, "active")


def test_drain_request_reaches_the_heartbeat(conn: psycopg.Connection[Any]) -> None:
    incarnation = register(conn, "n1").incarnation
    assert nodes.request_drain("n1").run(conn) is True
    assert nodes.request_drain("n1").run(conn) is True  # idempotent
    assert nodes.request_drain("nobody").run(conn) is False
    assert nodes.heartbeat("n1", incarnation, {}, False).run(conn).drain_requested
    assert [n.state for n in nodes.list_nodes().run(conn)] == ["draining"]


def test_sweep_marks_stale_nodes_dead_and_releases_their_claims(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    stale = register(conn, "stale").incarnation
    fresh = register(conn, "fresh").incarnation
    claim_some(dsn, Owner("stale", stale, 1), 3)
    assert {n.id: n.instances_claimed for n in nodes.list_nodes().run(conn)} == {
        "stale": 3, "fresh": 0}
    age(conn, "stale", 10)
    epochs = conn.execute("SELECT sum(claim_epoch) FROM instances").fetchone()[0]
    assert nodes.sweep_stale(5).run(conn) == nodes.Sweep(dead=("stale",), released=3)
    assert running(conn) == 0
    assert conn.execute("SELECT sum(claim_epoch) FROM instances").fetchone()[0] == epochs + 3
    assert nodes.sweep_stale(5).run(conn) == nodes.Sweep(dead=(), released=0)
    assert not nodes.heartbeat("stale", stale, {}, False).run(conn).alive, "dead stays dead"
    assert nodes.heartbeat("fresh", fresh, {}, False).run(conn).alive


def test_concurrent_sweeps_release_each_claim_once(dsn: str, conn: psycopg.Connection[Any]
                                                   ) -> None:
    stale = register(conn, "stale").incarnation
    claim_some(dsn, Owner("stale", stale, 1), 20)
    age(conn, "stale", 10)
    results: list[nodes.Sweep] = []
    barrier = threading.Barrier(4)

    def sweep() -> None:
        with psycopg.connect(dsn, autocommit=True) as own:
            barrier.wait()
            results.append(nodes.sweep_stale(5).run(own))

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.released for r in results) == 20
    assert sum(len(r.dead) for r in results) == 1
    assert conn.execute("SELECT DISTINCT claim_epoch FROM instances").fetchall() == [(2,)]


def test_sweep_releases_claims_of_an_incarnation_with_no_live_row(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    # A worker that claimed under an incarnation its node has since replaced.
    old = register(conn, "n1").incarnation
    claim_some(dsn, Owner("n1", old, 1), 2)
    conn.execute("UPDATE cluster_nodes SET incarnation = %(new)s", {"new": uuid.uuid4()})
    assert nodes.sweep_stale(60).run(conn).released == 2


def test_register_again_takes_over_and_releases_the_previous_claims(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    old = register(conn, "n1").incarnation
    claim_some(dsn, Owner("n1", old, 1), 2)
    age(conn, "n1", THRESHOLD_S)  # silent for the threshold: as good as dead
    again = register(conn, "n1")
    assert again.released == 2 and again.previous_state == "active"
    assert running(conn) == 0


def test_an_id_held_by_a_live_node_is_refused(dsn: str, conn: psycopg.Connection[Any]) -> None:
    holder = register(conn, "n1", host="alpha").incarnation
    claim_some(dsn, Owner("n1", holder, 1), 2)
    age(conn, "n1", 5)
    with pytest.raises(Conflict) as refused:
        register(conn, "n1", host="beta")
    assert re.match(r"node id n1 is held by a live node \(host alpha, pid 1, last heartbeat "
                    r"5\.\ds ago\)", str(refused.value)), str(refused.value)
    assert nodes.holder("n1").run(conn) == (holder, "active")
    assert running(conn) == 2, "the holder's claims are untouched"


def test_a_heartbeat_newer_than_the_reader_reads_as_just_now(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    # A reader's now() is when its transaction began; a heartbeat committed after that
    # (the registration waits for the row's lock) once read as "-0.0s ago".
    incarnation = register(conn, "n1").incarnation
    with psycopg.connect(dsn) as reader:
        began = reader.execute("SELECT now()").fetchone()[0]
        nodes.heartbeat("n1", incarnation, {}, False).run(conn)
        beat = conn.execute("SELECT last_heartbeat FROM cluster_nodes").fetchone()[0]
        assert beat > began
        [silent] = reader.execute(nodes.LOCK_PREVIOUS, {"node_id": "n1"}).fetchone()[-1:]
        [listed] = nodes.list_nodes().run(reader)
    assert (silent, listed.heartbeat_age_s) == (0.0, 0.0)


@pytest.mark.parametrize("how", ["dead", "gone"])
def test_an_id_whose_holder_is_dead_or_known_gone_is_taken_over(
        dsn: str, conn: psycopg.Connection[Any], how: str) -> None:
    holder = register(conn, "n1").incarnation
    claim_some(dsn, Owner("n1", holder, 1), 2)
    if how == "dead":
        conn.execute("UPDATE cluster_nodes SET state = 'dead'")
    seen: list[nodes.Holder] = []
    again = register(conn, "n1", holder_gone=lambda h: seen.append(h) or how == "gone")
    assert again.released == 2 and nodes.holder("n1").run(conn) == (again.incarnation,
                                                                     "active")
    assert [(h.incarnation, h.hostname, h.pid) for h in seen] == (
        [(holder, "host", 1)] if how == "gone" else [])


def test_a_replaced_incarnation_claims_nothing(dsn: str, conn: psycopg.Connection[Any]) -> None:
    old = register(conn, "n1").incarnation
    age(conn, "n1", THRESHOLD_S)
    new = register(conn, "n1").incarnation
    assert claim_some(dsn, Owner("n1", old, 1), 2) == []
    conn.execute("UPDATE cluster_nodes SET state = 'dead'")
    assert claim_some(dsn, Owner("n1", new, 1), 2) == [], "a node declared dead claims nothing"
    conn.execute("UPDATE cluster_nodes SET state = 'active'")
    assert len(claim_some(dsn, Owner("n1", new, 1), 2)) == 2


def test_a_claim_in_flight_during_a_takeover_takes_nothing(
        dsn: str, conn: psycopg.Connection[Any]) -> None:
    old = register(conn, "n1").incarnation
    with Client(dsn) as client:
        client.create_sequence("s", [{"id": "a", "handler": "noop"}])
        client.start_many([{"sequence": "s"} for _ in range(3)])
    taken: list[list[uuid.UUID]] = []
    with psycopg.connect(dsn) as takeover:
        # What a registration does first: lock the node row. Then the claim starts.
        takeover.execute("SELECT 1 FROM cluster_nodes WHERE id = 'n1' FOR UPDATE")
        claimer = threading.Thread(target=lambda: taken.append(asyncio.run(_claim(dsn, old))))
        claimer.start()
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND datname = current_database()")
        deadline = time.monotonic() + 10
        while conn.execute(waiting).fetchone()[0] == 0:  # the claim waits on the row lock
            assert time.monotonic() < deadline, "the claim never waited for the takeover"
            time.sleep(0.01)
        takeover.execute("UPDATE cluster_nodes SET incarnation = %s", (uuid.uuid4(),))
        takeover.commit()
        claimer.join(10)
    assert taken == [[]], "the claim saw the new incarnation and took nothing"
    assert running(conn) == 0


async def _claim(dsn: str, incarnation: uuid.UUID) -> list[uuid.UUID]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return [c.id for c in await claim(conn, Owner("n1", incarnation, 1), 3)]


def test_deregister_removes_the_row_and_releases(dsn: str, conn: psycopg.Connection[Any]
                                                 ) -> None:
    incarnation = register(conn, "n1").incarnation
    claim_some(dsn, Owner("n1", incarnation, 1), 2)

    async def leave() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as own:
            return await nodes.deregister(own, "n1", incarnation)

    assert asyncio.run(leave()) == 2
    assert nodes.list_nodes().run(conn) == []
    assert running(conn) == 0


def test_forget_dead_keeps_recent_dead_rows(conn: psycopg.Connection[Any]) -> None:
    register(conn, "gone")
    age(conn, "gone", 100)
    nodes.sweep_stale(5).run(conn)
    nodes.forget_dead(1000).run(conn)
    assert [n.state for n in nodes.list_nodes().run(conn)] == ["dead"]
    nodes.forget_dead(50).run(conn)
    assert nodes.list_nodes().run(conn) == []
