"""Which step handlers a worker process is running, in memory its supervisor can read.

A worker that dies (a handler calling `os._exit`, a segfaulting extension, the OOM killer)
cannot say what it was doing. So each worker keeps a small table in a shared file mapping:
its handler calls (`orch8.engine.calls.Caller`) mark a row just before a handler runs and
clear it when the handler returns. What the dead process wrote stays in the mapping, and
the supervisor reads it when it reaps the process: every row still marked is a step whose
execution ended with the process, to be charged an attempt; everything else the process
held goes back uncharged.

Cost per step: a few stores into memory, no system call, no message, no database write.
Most calls start and end on the event loop without ever waiting (`noop`, a handler that
only computes), one after another: those use the table's *lane*, one row kept for them,
whose step id is rewritten only when it changes and which needs no free-list bookkeeping
(`enter`, `leave`). A call that suspends moves to a row of its own (`detach`) for as long
as it runs; calls in threads take one too (`mark`, `clear`).

A row is written payload first and marked last, and cleared by unmarking it, so a process
killed half-way through writing a row leaves it unmarked (its handler had not started).
A worker that stops in an orderly way, but leaves a handler thread running that it cannot
interrupt, marks those rows *abandoned*: they go back uncharged, as a stop is not the
step's doing.

The mapping is an anonymous temporary file handed to the worker as a file descriptor, so
nothing is left on disk whatever happens to either process.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any

from orch8.handlers.context import StepContext

FREE, RUNNING, ABANDONED = 0, 1, 2
# state, attempt, instance id (high and low 64 bits: cheaper than UUID.bytes), length of
# the step id, step id (at most 128 ASCII characters: orch8.model).
ROW = struct.Struct("<BIQQB128s")
ROW_SIZE = 160
LOW_64 = (1 << 64) - 1
# A row's parts after its state, written apart in the lane: the attempt and instance id,
# and the step id (rewritten only when it changes).
_CALL = struct.Struct("<IQQ")
_STEP = struct.Struct("<B128s")
_STEP_OFFSET = 1 + _CALL.size


@dataclass(frozen=True)
class RunningStep:
    """A step whose handler was running when its process ended."""

    instance_id: uuid.UUID
    step_id: str
    # As the handler saw it (`ctx.attempt`): 1 on the first try.
    attempt: int
    # The worker gave it up while stopping (not the step's doing): release, do not charge.
    abandoned: bool = False


class RunningTable:
    """The table of one worker process. The supervisor creates it and reads it after the
    process has exited; the worker marks and clears rows (from any of its threads)."""

    def __init__(self, fd: int, rows: int) -> None:
        self._fd = fd
        self.rows = rows
        self._map = mmap.mmap(fd, (rows + 1) * ROW_SIZE)
        # list.pop and list.append are atomic under the GIL: no two threads get one row.
        self._free = list(range(rows - 1, -1, -1))
        self._step_ids: dict[str, bytes] = {}
        # The lane: the row after the others, used by the event loop's thread only.
        self._lane = rows * ROW_SIZE
        self._lane_step: str | None = None

    @classmethod
    def create(cls, rows: int) -> RunningTable:
        """A zeroed table of `rows` rows (and the lane) in an unnamed temporary file."""
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
        os.ftruncate(fd, (rows + 1) * ROW_SIZE)
        return cls(fd, rows)

    def __reduce__(self) -> Any:
        # Pickled only to start the worker: the descriptor travels like a Connection's.
        return (_rebuild, (reduction.DupFd(self._fd), self.rows))

    # -- the worker's side --------------------------------------------------------------

    def mark(self, context: StepContext) -> int:
        """Record that `context`'s handler starts now; the row to `clear` (-1: table full)."""
        try:
            row = self._free.pop()
        except IndexError:
            return -1
        offset = row * ROW_SIZE
        step = self._step_id(context.step_id)
        instance = context.instance_id.int
        ROW.pack_into(self._map, offset, FREE, context.attempt, instance >> 64,
                      instance & LOW_64, len(step), step)
        self._map[offset] = RUNNING
        return row

    def enter(self, context: StepContext) -> None:
        """Record, in the lane, that `context`'s handler starts now on the event loop (the
        lane holds one call: `leave` or `detach` it before the next)."""
        lane = self._lane
        if context.step_id is not self._lane_step:  # (a batch's calls share one str)
            step = self._step_id(context.step_id)
            _STEP.pack_into(self._map, lane + _STEP_OFFSET, len(step), step)
            self._lane_step = context.step_id
        instance = context.instance_id.int
        _CALL.pack_into(self._map, lane + 1, context.attempt, instance >> 64,
                        instance & LOW_64)
        self._map[lane] = RUNNING

    def leave(self) -> None:
        """The lane's handler returned (or raised)."""
        self._map[self._lane] = FREE

    def detach(self, context: StepContext) -> int:
        """The lane's handler suspended: it goes on in a row of its own, to `clear` when it
        ends (marked before the lane is freed: it is never unmarked meanwhile)."""
        row = self.mark(context)
        self.leave()
        return row

    def _step_id(self, step_id: str) -> bytes:
        step = self._step_ids.get(step_id)
        if step is None:
            step = self._step_ids[step_id] = step_id.encode()
        return step

    def clear(self, row: int) -> None:
        """The handler returned (or raised, or was cancelled)."""
        if row >= 0:
            self._map[row * ROW_SIZE] = FREE
            self._free.append(row)

    def running_instances(self) -> set[uuid.UUID]:
        """Instances whose handler still runs in this process (a thread outliving its task)."""
        return {step.instance_id for step in self.steps() if not step.abandoned}

    def abandon(self) -> None:
        """The process is stopping on purpose: what still runs is released uncharged."""
        for row in range(self.rows + 1):
            if self._map[row * ROW_SIZE] == RUNNING:
                self._map[row * ROW_SIZE] = ABANDONED

    # -- the supervisor's side ----------------------------------------------------------

    def steps(self) -> list[RunningStep]:
        """Every marked row (the process has exited, or the caller is that process)."""
        return list(self._marked())

    def _marked(self) -> Iterator[RunningStep]:
        for row in range(self.rows + 1):  # (the lane included)
            state, attempt, high, low, length, step = ROW.unpack_from(self._map,
                                                                      row * ROW_SIZE)
            if state in (RUNNING, ABANDONED):
                yield RunningStep(uuid.UUID(int=high << 64 | low), step[:length].decode(),
                                  attempt, state == ABANDONED)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def _rebuild(fd: Any, rows: int) -> RunningTable:
    return RunningTable(fd.detach(), rows)


def table_rows(max_in_flight: int) -> int:
    """Room for every step a worker can run at once: its in-flight instances, plus sync
    handlers still running in threads after their step timed out (the pool's size)."""
    return max_in_flight + min(64, max_in_flight) + 8
