"""The node's heartbeat, stale sweep and drain listener, each on a connection of its own.

The heartbeat never shares a connection with the API or the workers, so a busy pool can
never starve it into looking dead. Each beat, by the database's clock:

1. update our row (only while it is our incarnation and not dead);
2. if that found no row, learn why: declared dead (or removed) by another node's sweep
   means our claims were already released and fenced, so we register again as a new
   incarnation and the supervisor restarts its workers under it; another live
   incarnation holding our id means a second process was started with the same
   ORCH8_NODE_ID, and we stop rather than fight it for the row;
3. sweep: declare silent nodes dead and release their claims (every node does this; the
   statement is safe to run concurrently, so no leader is needed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any, Protocol

import psycopg

from orch8.config import Settings
from orch8.events import wait_any
from orch8.store import nodes
from orch8.store.nodes import Holder, Registration
from supervisor import processes

log = logging.getLogger("orch8.supervisor.heartbeat")

CONNECT_TIMEOUT_S = 5
# NOTIFY orch8_drain, <node id>: sent by `nodes.request_drain` from any node.
LISTEN_DRAIN = "LISTEN orch8_drain"
# Dead rows stay listed this long so an operator can see what died.
KEEP_DEAD_S = 3600.0


class HeartbeatOwner(Protocol):
    """What the heartbeat needs of the supervisor."""

    node_id: str
    incarnation: uuid.UUID

    def is_draining(self) -> bool: ...
    def summary(self) -> dict[str, Any]: ...
    def on_database(self, reachable: bool) -> None: ...
    def on_drain_requested(self) -> None: ...
    def on_new_incarnation(self, registration: Registration) -> None: ...
    def on_taken_over(self, holder: uuid.UUID) -> None: ...


class Heartbeat:
    def __init__(self, settings: Settings, dsn: str, owner: HeartbeatOwner) -> None:
        self._settings = settings
        self._dsn = dsn
        self._owner = owner
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._wake = asyncio.Event()
        # When a beat last succeeded (monotonic): the systemd watchdog pings only while
        # this is recent. Start-up counts as one: the node has just registered.
        self.last_beat_at = time.monotonic()

    def wake(self) -> None:
        """Beat now rather than at the end of the interval (a drain began)."""
        self._wake.set()

    async def register(self, incarnation: uuid.UUID) -> Registration:
        """Register the node as `incarnation` (at start-up, or after being declared dead).

        `orch8.errors.Conflict` if a live node holds the id.
        """
        conn = await self._connection()
        registration = await nodes.register(
            conn, self._owner.node_id, incarnation, socket.gethostname(), os.getpid(),
            self._settings.workers, self._settings.stale_threshold_s, holder_gone=exited_here)
        if registration.released:
            log.warning("released %d claims left by this node id's previous incarnation",
                        registration.released)
        return registration

    async def deregister(self) -> int:
        """Remove our row and release what our incarnation still holds."""
        conn = await self._connection()
        return await nodes.deregister(conn, self._owner.node_id, self._owner.incarnation)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every interval (sooner when woken) until `stop` is set."""
        interval = self._settings.heartbeat_interval_s
        while not stop.is_set():
            self._owner.on_database(await self._beat(timeout=max(5.0, interval)))
            self._wake.clear()
            await wait_any(stop, self._wake, timeout=interval)
        await self._drop_connection()

    async def _beat(self, timeout: float) -> bool:
        """One beat; whether the database answered.

        A connection that was open before this beat may have died with a database restart
        the node slept through: it is replaced and the beat tried again at once. Only a
        fresh connection failing means the database is unreachable; otherwise readiness
        would drop once more, late, after the database is already back.
        """
        while True:
            fresh = self._conn is None or self._conn.closed
            try:
                await asyncio.wait_for(self.run_once(), timeout)
                self.last_beat_at = time.monotonic()
                return True
            except (psycopg.Error, OSError, TimeoutError) as error:
                await self._drop_connection()
                if fresh:
                    log.warning("heartbeat failed (%s); retrying", error)
                    return False
                log.info("heartbeat connection lost (%s); reconnecting", error)

    async def run_once(self) -> None:
        """One beat and one sweep."""
        conn = await self._connection()
        owner = self._owner
        beat = await nodes.heartbeat(owner.node_id, owner.incarnation, owner.summary(),
                                     owner.is_draining()).run_async(conn)
        if not beat.alive and not await self._recover(conn):
            return
        if beat.drain_requested:
            owner.on_drain_requested()
        sweep = await nodes.sweep_stale(self._settings.stale_threshold_s).run_async(conn)
        if sweep.dead or sweep.released:
            log.warning("declared dead: %s; released %d claims; ended %d worker sessions",
                        ", ".join(sweep.dead) or "(no node)", sweep.released, sweep.ended)
        await nodes.forget_dead(KEEP_DEAD_S).run_async(conn)

    async def _recover(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Our row is not ours any more; return whether we carry on (re-registered)."""
        holder = await nodes.holder(self._owner.node_id).run_async(conn)
        if holder is not None and holder[1] != "dead":
            self._owner.on_taken_over(holder[0])
            return False
        log.error("node %s was declared dead by the cluster (missed heartbeats); its claims "
                  "were released. Registering again as a new incarnation.", self._owner.node_id)
        registration = await self.register(uuid.uuid4())
        self._owner.on_new_incarnation(registration)
        return True

    async def listen(self, stop: asyncio.Event) -> None:
        """Wake the heartbeat when a drain request for this node is NOTIFYed."""
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    await conn.execute(LISTEN_DRAIN)
                    async for notify in conn.notifies():
                        if notify.payload == self._owner.node_id:
                            self.wake()
            except (psycopg.Error, OSError) as error:
                log.debug("drain listener lost its connection (%s)", error)
                await asyncio.sleep(1.0)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                application_name=f"orch8 heartbeat {self._owner.node_id}")
        return self._conn

    async def close(self) -> None:
        """Close the heartbeat's connection (`run` does this itself when it ends)."""
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            except (psycopg.Error, OSError):
                pass
            self._conn = None


def exited_here(holder: Holder) -> bool:
    """Whether the holder of our node id was a process on this host that has exited (a
    node restarted at once after a crash, not a second node): then it may be taken over
    without waiting for it to go stale. A pid that is ours now (the same container
    restarted) was certainly its; any other live pid is assumed to still be it."""
    if holder.hostname != socket.gethostname():
        return False
    if holder.pid == os.getpid():
        return True
    return not processes.exists(holder.pid)
