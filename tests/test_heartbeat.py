"""`Heartbeat.run_once` against the real SQL, with the supervisor's side recorded."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from orch8.config import Settings
from orch8.store import nodes
from orch8.store.nodes import Registration
from supervisor.heartbeat import Heartbeat


class RecordingOwner:
    """The supervisor's half of the heartbeat, reduced to a log of what it was told."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.incarnation = uuid.uuid4()
        self.events: list[str] = []

    def is_draining(self) -> bool:
        return False

    def summary(self) -> dict[str, Any]:
        return {"in_flight": 0}

    def on_database(self, reachable: bool) -> None:
        self.events.append(f"database {reachable}")

    def on_drain_requested(self) -> None:
        self.events.append("drain")

    def on_new_incarnation(self, registration: Registration) -> None:
        self.incarnation = registration.incarnation
        self.events.append("new incarnation")

    def on_taken_over(self, holder: uuid.UUID) -> None:
        self.events.append("taken over")


def beat(dsn: str, owner: RecordingOwner, *, register: bool = False) -> None:
    async def run() -> None:
        heartbeat = Heartbeat(Settings(heartbeat_interval_s=1, stale_threshold_s=3), dsn, owner)
        if register:
            await heartbeat.register(owner.incarnation)
        await heartbeat.run_once()
        await heartbeat.close()

    asyncio.run(run())


def row(conn: psycopg.Connection[Any], node_id: str) -> tuple[Any, ...] | None:
    found = conn.execute("SELECT state, incarnation FROM cluster_nodes WHERE id = %(id)s",
                         {"id": node_id}).fetchone()
    return tuple(found) if found else None


@pytest.fixture
def owner(dsn: str) -> RecordingOwner:
    owner = RecordingOwner("n1")
    beat(dsn, owner, register=True)
    return owner


def test_a_live_node_just_beats(dsn: str, conn: psycopg.Connection[Any],
                                owner: RecordingOwner) -> None:
    beat(dsn, owner)
    assert owner.events == []
    assert row(conn, "n1") == ("active", owner.incarnation)


def test_declared_dead_registers_again_as_a_new_incarnation(
        dsn: str, conn: psycopg.Connection[Any], owner: RecordingOwner) -> None:
    first = owner.incarnation
    conn.execute("UPDATE cluster_nodes SET state = 'dead'")
    beat(dsn, owner)
    assert owner.events == ["new incarnation"]
    assert owner.incarnation != first
    assert row(conn, "n1") == ("active", owner.incarnation)


def test_a_drain_request_is_passed_on(dsn: str, conn: psycopg.Connection[Any],
                                      owner: RecordingOwner) -> None:
    nodes.request_drain("n1").run(conn)
    beat(dsn, owner)
    assert owner.events == ["drain"]


def test_an_id_held_by_another_live_process_is_not_fought_over(
        dsn: str, conn: psycopg.Connection[Any], owner: RecordingOwner) -> None:
    other = uuid.uuid4()
    conn.execute("UPDATE cluster_nodes SET incarnation = %(other)s", {"other": other})
    beat(dsn, owner)
    assert owner.events == ["taken over"]
    assert row(conn, "n1") == ("active", other)


def test_each_beat_sweeps_silent_nodes(dsn: str, conn: psycopg.Connection[Any],
                                       owner: RecordingOwner) -> None:
    silent = RecordingOwner("n2")
    beat(dsn, silent, register=True)
    conn.execute("UPDATE cluster_nodes SET last_heartbeat = now() - interval '10 seconds' "
                 "WHERE id = 'n2'")
    beat(dsn, owner)
    assert row(conn, "n2") == ("dead", silent.incarnation)
