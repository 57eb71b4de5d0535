"""Worker slots: one per worker the node runs, each holding at most one live process.

A slot outlives its processes. It remembers which incarnation its current process claims
under (so the supervisor can release exactly that process's claims when it dies), the table
of handlers that process is running (so it can charge the steps a death interrupted), when
it last heard from it (to find a hung one), and how often it failed (for restart backoff).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess

from orch8.api.node import WorkerReport
from supervisor.child import BOOT_FAILED_EXIT, Environ, WorkerStart, run_worker
from supervisor.protocol import Message, encode
from supervisor.running import RunningStep, RunningTable, table_rows

log = logging.getLogger("orch8.supervisor")

# Restarts after a death wait 0.5 s, 1 s, 2 s, ... up to 30 s while the worker keeps dying
# young; a worker that lived this long before dying was healthy: its restart is immediate
# and the backoff starts over.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0


# What `_import_as_here` sets in the environment the forkserver starts from.
IMPORT_PATH_VARIABLES = ("PYTHONPATH", "PYTHONSAFEPATH")


def worker_context() -> tuple[ForkServerContext | SpawnContext, Environ]:
    """A start method that is safe while the supervisor runs threads and an event loop,
    and the environment variables its workers must put back (`WorkerStart.environ`).

    Plain fork would copy a locked mutex or a half-used connection into the child. The
    forkserver forks from a clean, single-threaded server that has already imported the
    engine, so a restart costs a fork rather than a fresh interpreter.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["supervisor.child"])
        return context, _import_as_here()
    return multiprocessing.get_context("spawn"), ()


@functools.cache  # (once: a second call would take our own values for the node's)
def _import_as_here() -> Environ:
    """Have the forkserver import the engine from where this process imported it; return
    the variables' values before, for the workers to put back.

    The forkserver is a fresh `python -c`, so its `sys.path` starts with the working
    directory, and Pythons before 3.12.8 and 3.13.1 preload with that path instead of
    the supervisor's (CPython gh-117378). A working directory holding a `supervisor` or an
    `orch8` of its own (a checkout of another version, a script named `orch8.py`) would
    then have the workers run that code under this supervisor. So the forkserver starts
    with this process's `sys.path` as its PYTHONPATH and without the working directory in
    front (PYTHONSAFEPATH). They are set in this process's environment, which the
    forkserver inherits, and so does a forkserver started again after it died.
    (Redundant where Python passes the path itself, and harmless.)
    """
    before = tuple((name, os.environ.get(name)) for name in IMPORT_PATH_VARIABLES)
    os.environ["PYTHONPATH"] = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
    os.environ["PYTHONSAFEPATH"] = "1"
    return before


@dataclass
class WorkerSlot:
    number: int
    process: BaseProcess | None = None
    pipe: Connection | None = None
    # The incarnation the current (or last) process claims under.
    incarnation: uuid.UUID | None = None
    started_at: float = 0.0
    last_heard_at: float = 0.0
    booted: bool = False
    failures: int = 0
    restart_at: float = 0.0
    # Claims of a dead process not yet settled (the database was unreachable).
    pending_release: DeadWorker | None = None
    latest: WorkerReport | None = field(default=None)
    running: RunningTable | None = None
    # Processes started in this slot, the first one included.
    spawned: int = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None

    def due_to_start(self, now: float) -> bool:
        """Whether a process may be started in this slot now: its restart time has come
        and it holds no process. Not `not alive`: a process that has exited but is not
        reaped yet still holds claims that only reaping settles (charged or released), and
        a process started over it would leave them held for as long as the node lives."""
        return self.process is None and self.restart_at <= now

    def spawn(self, context: ForkServerContext | SpawnContext, start: WorkerStart) -> None:
        """Start a process for this slot."""
        ours, theirs = context.Pipe(duplex=True)
        running = RunningTable.create(table_rows(start.settings.max_in_flight))
        process = context.Process(target=run_worker, args=(start, theirs, running),
                                  name=f"orch8-worker-{self.number}", daemon=False)
        try:
            process.start()
        except BaseException:
            running.close()
            raise
        # Close our copy of the child's end: when we die, the child's read sees EOF.
        theirs.close()
        now = time.monotonic()
        self.process, self.pipe, self.incarnation = process, ours, start.incarnation
        self.running = running
        self.started_at = self.last_heard_at = now
        self.booted = False
        self.spawned += 1
        log.info("worker %d started (pid %s)", self.number, process.pid)

    def send(self, message: Message) -> None:
        """Best effort: a dead worker's pipe is closed; the reaper will notice."""
        if self.pipe is None or not self.alive:
            return
        try:
            self.pipe.send_bytes(encode(message))
        except (OSError, ValueError):
            pass

    def kill(self) -> None:
        if self.process is not None and self.process.pid and self.alive:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> DeadWorker:
        """Collect the exited process: why it ended and what it was running."""
        assert self.process is not None and self.incarnation is not None
        self.process.join(0)
        code = self.process.exitcode
        if self.pipe is not None:
            self.pipe.close()
        running: list[RunningStep] = []
        if self.running is not None:
            running = self.running.steps()  # the process is gone: the table is final
            self.running.close()
        dead = DeadWorker(self.number, self.process.pid or 0, self.incarnation,
                          describe_exit(code), tuple(running))
        self.process, self.pipe, self.running = None, None, None
        if self.latest is not None:
            self.latest = replace(self.latest, alive=False)
        return dead

    def schedule_restart(self) -> float:
        """Back off while the worker keeps dying young; return the delay chosen."""
        now = time.monotonic()
        if now - self.started_at > HEALTHY_AFTER_S:
            self.failures = 0
            delay = 0.0
        else:
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** self.failures)
            self.failures += 1
        self.restart_at = now + delay
        return delay


@dataclass(frozen=True)
class DeadWorker:
    """A worker process that has exited, as its slot saw it."""

    slot: int
    pid: int
    incarnation: uuid.UUID
    # "exited with code 1", "killed by SIGKILL", ...
    cause: str
    # Steps whose handler was running when it ended.
    running: tuple[RunningStep, ...]


def describe_exit(code: int | None) -> str:
    """"exited with code 1", "killed by SIGKILL", ... ."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == BOOT_FAILED_EXIT:
        return "failed at boot"
    return f"exited with code {code}"
