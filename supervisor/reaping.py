"""Reaping: what happens when a worker process has exited.

Its claims are released at once (fenced: the epoch rises, so a write it had in flight
can never land), without waiting for the node to look stale; the death is logged by
cause; the slot is restarted with backoff unless the node is stopping.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Protocol

import psycopg

from orch8.store.claims import release_owner
from supervisor.child import BOOT_FAILED_EXIT
from supervisor.phase import Phase
from supervisor.slots import WorkerSlot


class Reaper(Protocol):
    """What reaping needs of the supervisor (which implements it): the arrow points one
    way, from the supervisor to this module."""

    dsn: str
    incarnation: uuid.UUID
    failure: str | None

    @property
    def phase(self) -> Phase: ...

    def forget_fds(self, slot: WorkerSlot) -> None: ...

    def fail(self, message: str, exit_code: int = ...) -> None: ...


log = logging.getLogger("orch8.supervisor")

RELEASE_TIMEOUT_S = 5


async def reap(node: Reaper, slots: list[WorkerSlot]) -> None:
    """Collect every exited worker: log why, release its claims, plan its restart."""
    for slot in slots:
        if slot.process is None or slot.process.exitcode is None:
            continue
        node.forget_fds(slot)
        pid, code = slot.process.pid, slot.process.exitcode
        retired = slot.incarnation != node.incarnation  # stopped after a re-registration
        cause = slot.reap()
        expected = retired or node.phase.leaving
        level = logging.INFO if expected and code == 0 else logging.ERROR
        log.log(level, "worker %d (pid %s) %s", slot.number, pid, cause)
        slot.pending_release = slot.incarnation
        await release(node, slot)
        if code == BOOT_FAILED_EXIT and node.failure is None:
            node.fail(f"worker {slot.number} failed at boot", exit_code=BOOT_FAILED_EXIT)
        elif node.phase is Phase.ACTIVE:
            _plan_restart(slot, retired)


def _plan_restart(slot: WorkerSlot, retired: bool) -> None:
    if retired:
        slot.restart_at = 0.0  # not a failure: restart under the new incarnation now
        return
    delay = slot.schedule_restart()
    log.info("restarting worker %d in %.1fs", slot.number, delay)


async def release(node: Reaper, slot: WorkerSlot) -> bool:
    """Release the claims of the slot's last process; return whether that is done."""
    incarnation = slot.pending_release
    if incarnation is None:
        return True
    try:
        released = await asyncio.to_thread(_release, node.dsn, incarnation, slot.number)
    except (psycopg.Error, OSError) as error:
        log.warning("worker %d: could not release its claims yet (%s)", slot.number, error)
        return False
    slot.pending_release = None
    if released:
        log.warning("worker %d: released %d claimed instances", slot.number, released)
    return True


def _release(dsn: str, incarnation: uuid.UUID, slot: int) -> int:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=RELEASE_TIMEOUT_S) as conn:
        return release_owner(conn, incarnation, slot)
