"""Worker restart backoff, as the README documents it."""

from __future__ import annotations

import time

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
