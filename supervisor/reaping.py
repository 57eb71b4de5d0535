"""Reaping: what happens when a worker process has exited.

Its claims are settled at once, without waiting for the node to look stale, in one
transaction: every step whose handler was running when the process ended (its table in
`supervisor.running`) is charged an attempt, with the step's retry policy applied (retried
after its backoff, or failed into the dead letter once `max_attempts` is spent); everything
else it held goes back uncharged. Both raise the epoch, so a write the dead process had in
flight can never land. A step that kills its worker therefore costs at most `max_attempts`
worker deaths, on this node and every other, instead of crash-looping them.

The death is logged by cause and counted; the slot is restarted with backoff unless the
node is stopping.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

import psycopg

from orch8.engine.backoff import backoff_ms
from orch8.model import Step
from orch8.store.claims import Charge, HeldStep, charge, lock_held, release_owner
from orch8.store.sequences import Sequence, get_sequence
from supervisor.child import BOOT_FAILED_EXIT
from supervisor.phase import Phase
from supervisor.running import RunningStep
from supervisor.slots import DeadWorker, WorkerSlot


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

    def count(self, counter: str, amount: int = 1) -> None: ...


log = logging.getLogger("orch8.supervisor")

RELEASE_TIMEOUT_S = 5


async def reap(node: Reaper, slots: list[WorkerSlot]) -> None:
    """Collect every exited worker: log why, settle its claims, plan its restart."""
    for slot in slots:
        if slot.process is None or slot.process.exitcode is None:
            continue
        node.forget_fds(slot)
        code = slot.process.exitcode
        retired = slot.incarnation != node.incarnation  # stopped after a re-registration
        dead = slot.reap()
        expected = retired or node.phase.leaving
        level = logging.INFO if expected and code == 0 else logging.ERROR
        log.log(level, "worker %d (pid %s) %s", slot.number, dead.pid, dead.cause)
        if not expected or code != 0:
            node.count("worker_deaths")
        slot.pending_release = dead
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
    """Settle the claims of the slot's last process; return whether that is done."""
    dead = slot.pending_release
    if dead is None:
        return True
    try:
        settled = await asyncio.to_thread(settle, node.dsn, dead)
    except (psycopg.Error, OSError) as error:
        log.warning("worker %d: could not release its claims yet (%s)", slot.number, error)
        return False
    slot.pending_release = None
    for line in settled.charged:
        log.warning("worker %d: %s", slot.number, line)
    if settled.released:
        log.warning("worker %d: released %d claimed instances", slot.number, settled.released)
    node.count("released", settled.released)
    node.count("retried", settled.retried)
    node.count("failed", settled.failed)
    return True


@dataclass(frozen=True)
class Settlement:
    """What settling a dead worker's claims did."""

    released: int = 0
    retried: int = 0
    failed: int = 0
    # One line per charged step, for the log.
    charged: tuple[str, ...] = ()


def settle(dsn: str, dead: DeadWorker) -> Settlement:
    """Charge the dead worker's interrupted steps, release the rest of its claims."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=RELEASE_TIMEOUT_S) as conn:
        with conn.transaction():
            interrupted = [step for step in dead.running if not step.abandoned]
            held = lock_held(conn, dead.incarnation, dead.slot,
                             list({step.instance_id for step in interrupted}))
            charges = _charges(conn, dead, held, interrupted)
            states = charge(conn, charges)
            released = release_owner(conn, dead.incarnation, dead.slot)
    retried = sum(1 for state in states.values() if state == "scheduled")
    lines = tuple(f"instance {c.id}: {c.error}; "
                  + ("failed (dead letter)" if c.backoff_ms is None
                     else f"retrying in {c.backoff_ms / 1000:.1f}s")
                  for c in charges if c.id in states)
    return Settlement(released, retried, len(states) - retried, lines)


def _charges(conn: psycopg.Connection, dead: DeadWorker, held: list[HeldStep],
             interrupted: list[RunningStep]) -> list[Charge]:
    """The attempt each interrupted step is charged, under its step's retry policy."""
    definitions: dict[tuple[str, int], Sequence] = {}
    charges = []
    for row in held:
        key = (row.sequence_name, row.sequence_version)
        if key not in definitions:
            definitions[key] = get_sequence(*key).run(conn)
        step = _interrupted_step(definitions[key].steps, row, interrupted)
        if step is None:
            continue
        attempt = row.attempt + 1
        error = f"worker {dead.cause} while running step {step.id}"
        retry = attempt < step.retry.max_attempts
        charges.append(Charge(row.id, row.epoch, error,
                              backoff_ms(step.retry, attempt) if retry else None))
    return charges


def _interrupted_step(steps: tuple[Step, ...], row: HeldStep,
                      interrupted: list[RunningStep]) -> Step | None:
    """The step of `row` whose execution ended with the process, if it is still where
    that execution left it; its retry policy decides the charge.

    Only the execution the row is still at: not an older one whose thread outlived its
    timed-out step, nor a step the instance has already moved past. A held claim runs an
    instance's steps one after another before anything of them is written (first
    attempts only, `orch8.engine.executor`), so a row still scheduled at a first attempt
    may have died at a later step: the charge lands on the row (its next attempt runs
    claimed, step by step) under the policy of the step that was running.
    """
    if row.step_index >= len(steps):
        return None
    ran = {(s.step_id, s.attempt) for s in interrupted if s.instance_id == row.id}
    current = steps[row.step_index]
    if (current.id, row.attempt + 1) in ran:
        return current
    if row.state == "scheduled" and row.attempt == 0:
        return next((step for step in steps[row.step_index + 1:] if (step.id, 1) in ran),
                    None)
    return None
