"""Worker restart backoff, as the README documents it."""

from __future__ import annotations

import multiprocessing
import sys
import time
import uuid

from supervisor.slots import BACKOFF_MAX_S, HEALTHY_AFTER_S, WorkerSlot


def test_restarts_of_a_worker_dying_young_back_off_from_half_a_second() -> None:
    slot = WorkerSlot(1, started_at=time.monotonic())
    delays = [slot.schedule_restart() for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX_S, BACKOFF_MAX_S,
                      BACKOFF_MAX_S]


def test_a_worker_that_was_healthy_long_restarts_at_once_and_the_backoff_starts_over() -> None:
    slot = WorkerSlot(1, started_at=time.monotonic(), failures=5)
    slot.started_at = time.monotonic() - HEALTHY_AFTER_S - 1
    assert slot.schedule_restart() == 0.0
    slot.started_at = time.monotonic()
    assert slot.schedule_restart() == 0.5


def test_a_slot_whose_process_exited_is_not_started_again_until_it_is_reaped() -> None:
    """A worker can exit between the reaper's look at its slot and the spawn check that
    follows it. Starting a new process there would drop the dead one unreaped: its claims
    never settled, the step that killed it never charged (seen once, in the poison test)."""
    context = multiprocessing.get_context("spawn")
    slot = WorkerSlot(1, incarnation=uuid.uuid4())
    living = context.Process(target=time.sleep, args=(60,))
    living.start()
    try:
        slot.process = living
        assert not slot.due_to_start(time.monotonic())
    finally:
        living.kill()
        living.join(10)
    exited = context.Process(target=sys.exit, args=(5,))
    exited.start()
    exited.join(30)
    assert exited.exitcode == 5
    slot.process = exited
    assert not slot.alive and not slot.due_to_start(time.monotonic())
    dead = slot.reap()
    assert dead.cause == "exited with code 5"
    assert slot.process is None and slot.due_to_start(time.monotonic())
