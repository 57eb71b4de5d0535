"""The `cluster_nodes` table: who is alive, judged by the database's clock.

A node registers with a fresh incarnation, heartbeats on its own connection, and removes
its row when it leaves. Every node sweeps: rows whose heartbeat is older than the
threshold are marked dead and their claims released (epoch bumped) in one statement, so
several nodes sweeping at once release each claim exactly once and a frozen node that
wakes up finds every late write refused by the fence.

Lock order, everywhere: the `cluster_nodes` row first, then `instances` rows. Workers
only ever lock `instances` rows, so no statement here can deadlock with a claim.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row

from orch8.errors import Conflict
from orch8.store.claims import RELEASE_OWNER, release_owner_params
from orch8.store.query import Query, Row


@dataclass(frozen=True)
class Registration:
    """The row a node wrote at start-up (or when it came back as a new incarnation)."""

    node_id: str
    incarnation: uuid.UUID
    started_at: datetime
    # Claims left by the previous holder of this node id, released now.
    released: int
    # The previous row's state, if the id was registered before ("dead", "active", ...).
    previous_state: str | None


@dataclass(frozen=True)
class Holder:
    """Who held a node id when another process asked to register under it."""

    incarnation: uuid.UUID
    state: str
    hostname: str
    pid: int
    last_heartbeat: datetime
    # Seconds since that heartbeat, by the database's clock: its now(), the start of the
    # reading transaction, so a heartbeat committed since (this statement waits for the
    # row's lock) would read negative; it reads as 0.
    silent_s: float


# Three statements in one transaction, in the lock order above. FOR UPDATE on the
# previous row makes a concurrent sweep of it wait for us (or us for it), so its claims
# are released once, here or there; and it makes claims of the previous incarnation in
# flight finish first, while later ones see the new incarnation and take nothing (the
# claim reads this row FOR KEY SHARE: orch8.store.claims).
LOCK_PREVIOUS = """
SELECT incarnation, state, hostname, pid, last_heartbeat,
       greatest(date_part('epoch', now() - last_heartbeat), 0) AS silent_s
FROM cluster_nodes WHERE id = %(node_id)s FOR UPDATE
"""
UPSERT = """
INSERT INTO cluster_nodes (id, incarnation, hostname, pid, workers, state)
VALUES (%(node_id)s, %(incarnation)s, %(hostname)s, %(pid)s, %(workers)s, 'active')
ON CONFLICT (id) DO UPDATE
SET incarnation = excluded.incarnation, hostname = excluded.hostname, pid = excluded.pid,
    workers = excluded.workers, state = 'active', started_at = now(),
    last_heartbeat = now(), drain_requested_at = NULL, stats = '{}'
RETURNING started_at
"""


async def register(conn: psycopg.AsyncConnection[Any], node_id: str, incarnation: uuid.UUID,
                   hostname: str, pid: int, workers: int, stale_threshold_s: float,
                   holder_gone: Callable[[Holder], bool] = lambda holder: False
                   ) -> Registration:
    """Insert (or take over) the node's row as `incarnation`, state `active`.

    A previous holder of the id may be taken over only if it is dead: declared so, silent
    for `stale_threshold_s`, or known gone by `holder_gone` (the caller's knowledge, such
    as "that process ran on this host and has exited"). Otherwise a live node holds the
    id, and `Conflict` says which. A holder taken over has its claims released with the
    epoch bumped, so nothing it still runs can write.
    """
    params = {"node_id": node_id, "incarnation": incarnation, "hostname": hostname,
              "pid": pid, "workers": workers}
    released, previous_state = 0, None
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(LOCK_PREVIOUS, params)
            previous = await cursor.fetchone()
        if previous is not None:
            holder = Holder(**previous)
            if _alive(holder, stale_threshold_s) and not holder_gone(holder):
                raise Conflict(_held_by(node_id, holder))
            previous_state = holder.state
            freed = await conn.execute(RELEASE_OWNER,
                                       release_owner_params(holder.incarnation, None))
            released = int((await freed.fetchone())[0])  # type: ignore[index]
        row = await (await conn.execute(UPSERT, params)).fetchone()
    assert row is not None
    return Registration(node_id, incarnation, row[0], released, previous_state)


def _alive(holder: Holder, stale_threshold_s: float) -> bool:
    return holder.state != "dead" and holder.silent_s < stale_threshold_s


def _held_by(node_id: str, holder: Holder) -> str:
    return (f"node id {node_id} is held by a live node (host {holder.hostname}, pid "
            f"{holder.pid}, last heartbeat {holder.silent_s:.1f}s ago); two nodes must not "
            "share ORCH8_NODE_ID: stop that one first, or wait until it is declared dead")


@dataclass(frozen=True)
class Beat:
    """What one heartbeat learned."""

    # False: the row is gone, dead, or held by another incarnation (see `holder`).
    alive: bool
    drain_requested: bool = False


# Only our own incarnation's live row: a dead row stays dead (its claims are gone).
HEARTBEAT = """
UPDATE cluster_nodes
SET last_heartbeat = now(), stats = %(stats)s::jsonb,
    state = CASE WHEN %(draining)s AND state = 'active' THEN 'draining' ELSE state END
WHERE id = %(node_id)s AND incarnation = %(incarnation)s AND state <> 'dead'
RETURNING drain_requested_at IS NOT NULL AS drain_requested
"""


def heartbeat(node_id: str, incarnation: uuid.UUID, stats: dict[str, Any],
              draining: bool) -> Query[Beat]:
    """Record that the node is alive now; learn whether someone asked it to drain."""
    params = {"node_id": node_id, "incarnation": incarnation, "draining": draining,
              "stats": orjson.dumps(stats).decode()}

    def read(rows: list[Row]) -> Beat:
        return Beat(True, bool(rows[0]["drain_requested"])) if rows else Beat(False)

    return Query(HEARTBEAT, params, read)


HOLDER = "SELECT incarnation, state FROM cluster_nodes WHERE id = %(node_id)s"


def holder(node_id: str) -> Query[tuple[uuid.UUID, str] | None]:
    """Who holds the node id now: (incarnation, state), or None when the row is gone."""
    return Query(HOLDER, {"node_id": node_id},
                 lambda rows: (rows[0]["incarnation"], rows[0]["state"]) if rows else None)


# Any node may call this for any node; the NOTIFY tells the target at once, and its next
# heartbeat reads drain_requested_at in case the notification was missed.
REQUEST_DRAIN = """
WITH target AS (
    UPDATE cluster_nodes
    SET drain_requested_at = coalesce(drain_requested_at, now()),
        state = CASE WHEN state = 'active' THEN 'draining' ELSE state END
    WHERE id = %(node_id)s
    RETURNING id
)
SELECT id, pg_notify('orch8_drain', id) FROM target
"""


def request_drain(node_id: str) -> Query[bool]:
    """Ask `node_id` to drain (idempotent); False when no such node is registered."""
    return Query(REQUEST_DRAIN, {"node_id": node_id}, lambda rows: bool(rows))


@dataclass(frozen=True)
class Sweep:
    """What one stale sweep did."""

    dead: tuple[str, ...]
    released: int
    # Database sessions of the dead nodes' workers that the sweep ended.
    ended: int = 0


# One statement: mark stale nodes dead and release their claims, so a claim is never
# released without its node being dead nor a node dead with its claims still held.
# Concurrent sweeps serialise on the node rows (the second re-checks `state <> 'dead'`
# after the first commits and finds nothing) and on the instance rows (re-checked
# `state = 'running'`). Claims whose incarnation has no live row at all (a node that
# re-registered or deregistered while a worker still claimed) are released too, which
# is why every claimer must register its incarnation before claiming (the supervisor
# does); the `claimed_at < now()` guard spares claims made after this snapshot.
SWEEP_STALE = """
WITH stale AS (
    UPDATE cluster_nodes SET state = 'dead'
    WHERE state <> 'dead'
      AND last_heartbeat < now() - %(threshold_s)s * interval '1 second'
    RETURNING id, incarnation
), released AS (
    -- Gives claims back without touching attempts; the epoch rises so late writes are
    -- refused.
    UPDATE instances i
    SET state = 'scheduled', claim_epoch = claim_epoch + 1, updated_at = now(),
        claimed_by = NULL, claim_incarnation = NULL, claimed_slot = NULL
    WHERE i.state = 'running' AND i.claimed_at < now()
      AND (i.claim_incarnation IN (SELECT incarnation FROM stale)
           OR NOT EXISTS (SELECT 1 FROM cluster_nodes n
                          WHERE n.incarnation = i.claim_incarnation AND n.state <> 'dead'))
    RETURNING i.id
), ended AS (
    -- A dead node's worker sessions that hold a transaction open, waiting on their
    -- client, end too: a frozen worker's held claim (orch8.store.claims.LOCK_DUE) keeps
    -- its rows locked until its transaction ends. (Its state may read `active`, not
    -- `idle in transaction`: it is sent in pipeline mode, and the server reports a
    -- session idle only at a sync.) Its other sessions stay, so that a late write from
    -- it is refused by the fence like any other. Only sessions of our own role, which a
    -- role may end.
    -- Each is waited for (up to a second): once the sweep returns, the rows it held are
    -- free for the workers its NOTIFY wakes.
    SELECT pg_terminate_backend(a.pid, 1000) FROM pg_stat_activity a
    WHERE a.application_name IN (SELECT 'orch8 worker ' || incarnation FROM stale)
      AND a.xact_start IS NOT NULL AND a.wait_event = 'ClientRead'
      AND a.usename = current_user
)
SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM stale) AS dead,
       (SELECT count(*) FROM released) AS released,
       (SELECT count(*) FROM ended) AS ended,
       pg_notify('orch8_work', '')
"""


def worker_session(incarnation: uuid.UUID) -> str:
    """The application name of a worker's database sessions, by which a sweep that
    declares its node dead ends them (`SWEEP_STALE`)."""
    return f"orch8 worker {incarnation}"


def sweep_stale(threshold_s: float) -> Query[Sweep]:
    """Declare nodes silent for `threshold_s` dead and give their claims back."""

    def read(rows: list[Row]) -> Sweep:
        return Sweep(tuple(rows[0]["dead"]), int(rows[0]["released"]), int(rows[0]["ended"]))

    return Query(SWEEP_STALE, {"threshold_s": threshold_s}, read)


# Dead rows stay visible in /cluster/nodes for a while, then go.
FORGET_DEAD = """
DELETE FROM cluster_nodes
WHERE state = 'dead' AND last_heartbeat < now() - %(keep_s)s * interval '1 second'
"""


def forget_dead(keep_s: float = 86_400.0) -> Query[None]:
    """Delete rows of nodes dead for longer than `keep_s`."""
    return Query(FORGET_DEAD, {"keep_s": keep_s}, lambda rows: None)


@dataclass(frozen=True)
class NodeRow:
    """One node as /cluster/nodes shows it."""

    id: str
    hostname: str
    started_at: datetime
    last_heartbeat: datetime
    state: str
    workers: int
    instances_claimed: int
    # Seconds since the last heartbeat, by the database's clock (the dashboard's age).
    heartbeat_age_s: float = 0.0
    # Worker processes up at the last heartbeat (None before the first report).
    workers_alive: int | None = None


# instances_claimed counts by incarnation (the partial index on running rows), so a
# previous life's claims are never counted for the node that replaced it.
LIST_NODES = """
SELECT n.id, n.hostname, n.started_at, n.last_heartbeat, n.state, n.workers,
       (SELECT count(*) FROM instances i
        WHERE i.state = 'running' AND i.claim_incarnation = n.incarnation) AS instances_claimed,
       greatest(date_part('epoch', now() - n.last_heartbeat), 0) AS heartbeat_age_s,
       (n.stats ->> 'workers_alive')::int AS workers_alive
FROM cluster_nodes n
ORDER BY n.id
"""


def list_nodes() -> Query[list[NodeRow]]:
    """Every registered node, dead ones included, by id."""
    return Query(LIST_NODES, {}, lambda rows: [NodeRow(**row) for row in rows])


# Two statements in one transaction, node row first (the lock order above): the row
# goes, then whatever this incarnation still holds (nothing after a clean drain) goes back.
DEREGISTER_NODE = """
DELETE FROM cluster_nodes WHERE id = %(node_id)s AND incarnation = %(incarnation)s
"""

async def deregister(conn: psycopg.AsyncConnection[Any], node_id: str,
                     incarnation: uuid.UUID) -> int:
    """Remove the node's row and release its remaining claims; return how many."""
    params = {"node_id": node_id, "incarnation": incarnation}
    async with conn.transaction():
        await conn.execute(DEREGISTER_NODE, params)
        cursor = await conn.execute(RELEASE_OWNER, release_owner_params(incarnation, None))
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class NodeTotals:
    """One live node incarnation's counters as of its last heartbeat."""

    id: str
    incarnation: uuid.UUID
    completed: int
    failed: int


NODE_TOTALS = """
SELECT id, incarnation, coalesce((stats ->> 'completed')::bigint, 0) AS completed,
       coalesce((stats ->> 'failed')::bigint, 0) AS failed
FROM cluster_nodes
WHERE state <> 'dead'
"""


def node_totals() -> Query[list[NodeTotals]]:
    """Completed and failed counts of every live node (the dashboard's throughput)."""
    return Query(NODE_TOTALS, {}, lambda rows: [NodeTotals(**row) for row in rows])
