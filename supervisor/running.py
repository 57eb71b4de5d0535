"""Which step handlers a worker process is running, in memory its supervisor can read.

A worker that dies (a handler calling `os._exit`, a segfaulting extension, the OOM killer)
cannot say what it was doing. So each worker keeps a small table in a shared file mapping:
a handler marks its row just before it runs and clears it when it returns. What the dead
process wrote stays in the mapping, and the supervisor reads it when it reaps the process:
every row still marked is a step whose execution ended with the process, to be charged an
attempt; everything else the process held goes back uncharged.

Cost per step: two stores into memory, no system call, no message, no database write.

A row is written payload first and marked last, and cleared by unmarking it, so a process
killed half-way through writing a row leaves it unmarked (its handler had not started).
A worker that stops in an orderly way, but leaves a handler thread running that it cannot
interrupt, marks those rows *abandoned*: they go back uncharged, as a stop is not the
step's doing.

The mapping is an anonymous temporary file handed to the worker as a file descriptor, so
nothing is left on disk whatever happens to either process.
"""

from __future__ import annotations

import asyncio
import functools
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
from orch8.handlers.registry import HandlerFunction, Registry

FREE, RUNNING, ABANDONED = 0, 1, 2
# state, attempt, length of the step id, instance id (high and low 64 bits: cheaper than
# UUID.bytes), step id (at most 128 ASCII characters: orch8.model).
ROW = struct.Struct("<BIBQQ128s")
ROW_SIZE = 160
LOW_64 = (1 << 64) - 1


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
        self._map = mmap.mmap(fd, rows * ROW_SIZE)
        # list.pop and list.append are atomic under the GIL: no two threads get one row.
        self._free = list(range(rows - 1, -1, -1))
        self._step_ids: dict[str, bytes] = {}

    @classmethod
    def create(cls, rows: int) -> RunningTable:
        """A zeroed table of `rows` rows in an unnamed temporary file."""
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
        os.ftruncate(fd, rows * ROW_SIZE)
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
        step = self._step_ids.get(context.step_id)
        if step is None:
            step = self._step_ids[context.step_id] = context.step_id.encode()
        instance = context.instance_id.int
        ROW.pack_into(self._map, offset, FREE, context.attempt, len(step),
                      instance >> 64, instance & LOW_64, step)
        self._map[offset] = RUNNING
        return row

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
        for row in range(self.rows):
            if self._map[row * ROW_SIZE] == RUNNING:
                self._map[row * ROW_SIZE] = ABANDONED

    # -- the supervisor's side ----------------------------------------------------------

    def steps(self) -> list[RunningStep]:
        """Every marked row (the process has exited, or the caller is that process)."""
        return list(self._marked())

    def _marked(self) -> Iterator[RunningStep]:
        for row in range(self.rows):
            state, attempt, length, high, low, step = ROW.unpack_from(self._map,
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


def tracked(registry: Registry, table: RunningTable) -> Registry:
    """A registry whose handlers mark `table` while they run.

    A handler that raises SystemExit (or KeyboardInterrupt) takes the process down with
    it, so its row stays marked; any other ending clears it.
    """
    wrapped = Registry()
    for name in registry.names():
        handler = registry.get(name)
        assert handler is not None
        function = (_tracked_async(handler.function, table) if handler.is_async
                    else _tracked_sync(handler.function, table))
        wrapped.register(name, function)
    return wrapped


def _tracked_sync(function: HandlerFunction, table: RunningTable) -> HandlerFunction:
    # Runs in the handler thread: the row stays marked for as long as the thread runs the
    # handler, even after its step timed out or its task was cancelled.
    @functools.wraps(function)
    def run(context: StepContext, params: dict[str, Any]) -> Any:
        row = table.mark(context)
        try:
            result = function(context, params)
        except Exception:
            table.clear(row)
            raise
        table.clear(row)
        return result

    return run


def _tracked_async(function: HandlerFunction, table: RunningTable) -> HandlerFunction:
    @functools.wraps(function)
    async def run(context: StepContext, params: dict[str, Any]) -> Any:
        row = table.mark(context)
        try:
            result = await function(context, params)
        # GeneratorExit: closed where it waited (a held claim whose write failed stops the
        # calls that suspended in it); it no longer runs.
        except (Exception, asyncio.CancelledError, GeneratorExit):
            table.clear(row)
            raise
        table.clear(row)
        return result

    return run
