"""Worker slots: one per worker the node runs, each holding at most one live process.

A slot outlives its processes. It remembers which incarnation its current process claims
under (so the supervisor can release exactly that process's claims when it dies), when it
last heard from it (to find a hung one), and how often it failed (for restart backoff).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import uuid
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess

from orch8.api.node import WorkerReport
from supervisor.child import BOOT_FAILED_EXIT, WorkerStart, run_worker
from supervisor.protocol import Message, encode

log = logging.getLogger("orch8.supervisor")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# A worker that lived this long before dying was healthy: its next restart is immediate.
HEALTHY_AFTER_S = 30.0


def worker_context() -> ForkServerContext | SpawnContext:
    """A start method that is safe while the supervisor runs threads and an event loop.

    Plain fork would copy a locked mutex or a half-used connection into the child. The
    forkserver forks from a clean, single-threaded server that has already imported the
    engine, so a restart costs a fork rather than a fresh interpreter.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["supervisor.child"])
        return context
    return multiprocessing.get_context("spawn")


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
    # Claims of a dead process not yet released (the database was unreachable).
    pending_release: uuid.UUID | None = None
    latest: WorkerReport | None = field(default=None)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None

    def spawn(self, context: ForkServerContext | SpawnContext, start: WorkerStart) -> None:
        """Start a process for this slot."""
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(target=run_worker, args=(start, theirs),
                                  name=f"orch8-worker-{self.number}", daemon=False)
        process.start()
        # Close our copy of the child's end: when we die, the child's read sees EOF.
        theirs.close()
        now = time.monotonic()
        self.process, self.pipe, self.incarnation = process, ours, start.incarnation
        self.started_at = self.last_heard_at = now
        self.booted = False
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

    def reap(self) -> str:
        """Collect the exited process; return why it ended, for the log."""
        assert self.process is not None
        self.process.join(0)
        code = self.process.exitcode
        if self.pipe is not None:
            self.pipe.close()
        self.process, self.pipe = None, None
        if self.latest is not None:
            self.latest = replace(self.latest, alive=False)
        return describe_exit(code)

    def schedule_restart(self) -> float:
        """Back off after repeated failures; return the delay chosen."""
        now = time.monotonic()
        if now - self.started_at > HEALTHY_AFTER_S:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(
            BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        self.failures += 1
        self.restart_at = now + delay
        return delay


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
