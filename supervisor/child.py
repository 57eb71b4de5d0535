"""The worker process: what runs on the other side of the pipe.

`run_worker` is the `multiprocessing.Process` target. The process is started by the
forkserver (or spawn), so it inherits no threads, loop or connections from the
supervisor and does all process-wide set-up itself: title, signals, logging, handlers.

It exits on its own when the supervisor goes away (pipe closed, or its parent process
changes), releasing what it held, so a `kill -9` of the supervisor leaves no orphans
working for a node that no longer heartbeats.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection

from orch8.config import Settings
from orch8.database import redact
from orch8.engine.stats import METRICS_DIR_VARIABLE, process_stats
from orch8.engine.worker import Worker
from orch8.errors import ConfigError
from orch8.handlers import load_modules
from orch8.store.claims import Owner
from supervisor import processes
from supervisor.protocol import BootFailed, Drain, Hurry, ProtocolError, Report, decode, encode
from supervisor.running import RunningTable

log = logging.getLogger("orch8.supervisor.worker")

# Environment variables and the values a worker sets them to (None: unset).
Environ = tuple[tuple[str, str | None], ...]

# Reserved exit code: the worker could not boot; the supervisor stops instead of respawning.
BOOT_FAILED_EXIT = 3
REPORT_INTERVAL_S = 0.5


@dataclass(frozen=True)
class WorkerStart:
    """Everything a worker needs, pickled to it once (the DSN travels here, never in argv)."""

    settings: Settings
    dsn: str
    node_id: str
    incarnation: uuid.UUID
    slot: int
    supervisor_pid: int
    # The node's metrics directory: every count is written through to a file in it.
    metrics_dir: str
    # Environment variables set for the forkserver's sake, with the node's own values to
    # put back (`supervisor.slots.worker_context`; None: unset).
    environ: Environ = ()

    @property
    def title(self) -> str:
        return f"orch8 worker {self.slot}/{self.settings.workers} {self.node_id}"


def run_worker(start: WorkerStart, pipe: Connection, running: RunningTable) -> None:
    """Process entry point: set up, load handlers, run the claim loop until told to stop.

    `running` is the table of handlers running in this process, which the supervisor reads
    if the process dies (see `supervisor.running`).
    """
    _set_up_process(start)
    try:
        load_modules(start.settings.handlers)
    except ConfigError as error:
        _send(pipe, BootFailed(start.slot, str(error)))
        sys.exit(BOOT_FAILED_EXIT)
    try:
        asyncio.run(_serve(start, pipe, running))
    except Exception as error:
        # The supervisor logs the exit and restarts us with backoff; one line is enough.
        log.error("worker %d failed: %s", start.slot, redact(f"{type(error).__name__}: {error}"))
        _exit_now(running, 1)
    # A handler's SystemExit never gets here: its step stays marked, and is charged.
    _exit_now(running, 0)


def _exit_now(running: RunningTable, code: int) -> None:
    """End the process at once, even while plain handlers still run in threads.

    Their claims were kept (see `orch8.engine.worker`); once we are gone nothing can run
    them, and the supervisor releases them, uncharged: a stop is not the step's doing.
    A normal exit would first wait for every handler thread to return.
    """
    running.abandon()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _set_up_process(start: WorkerStart) -> None:
    import setproctitle

    setproctitle.setproctitle(start.title)
    # A handler, and whatever it starts, sees the node's environment, not the forkserver's.
    for name, value in start.environ:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.environ[METRICS_DIR_VARIABLE] = start.metrics_dir
    # A hung worker gets SIGABRT from the supervisor: print every thread's stack first.
    faulthandler.enable()
    # Ctrl-C (and Ctrl-\) reach the whole group; the supervisor decides what they mean
    # and tells us over the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=start.settings.log_level,
        format=f"%(asctime)s %(levelname)s [worker {start.slot} pid %(process)d] "
               "%(name)s: %(message)s",
        force=True,
    )


async def _serve(start: WorkerStart, pipe: Connection, running: RunningTable) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    owner = Owner(start.node_id, start.incarnation, start.slot)
    worker = Worker(start.settings, start.dsn, owner, stats=process_stats(), tracker=running)
    control = _Control(worker, stop, pipe)
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # our own drain
    loop.add_reader(pipe.fileno(), control.on_readable)
    reporter = asyncio.create_task(_report(start, worker, control, stop), name="report")
    log.info("worker %d started (incarnation %s)", start.slot, start.incarnation)
    try:
        await worker.run(stop)
    finally:
        reporter.cancel()
        loop.remove_reader(pipe.fileno())
        control.send_report(start.slot)
    log.info("worker %d stopped", start.slot)


class _Control:
    """Reads the supervisor's messages; notices when the supervisor is gone."""

    def __init__(self, worker: Worker, stop: asyncio.Event, pipe: Connection) -> None:
        self._worker = worker
        self._stop = stop
        self._pipe = pipe
        self.orphaned = False

    def on_readable(self) -> None:
        try:
            message = decode(self._pipe.recv_bytes())
        except (EOFError, OSError):
            self.orphan("the supervisor's pipe closed")
            return
        except ProtocolError as error:
            log.error("ignoring a message from the supervisor: %s", error)
            return
        if isinstance(message, Hurry):
            self._worker.hurry()
        if isinstance(message, Drain | Hurry):
            self._stop.set()

    def orphan(self, why: str) -> None:
        """The supervisor is gone: nobody heartbeats for us, so stop now and release."""
        if self.orphaned:
            return
        self.orphaned = True
        log.warning("%s; stopping now", why)
        asyncio.get_running_loop().remove_reader(self._pipe.fileno())
        self._worker.hurry()
        self._stop.set()

    def send_report(self, slot: int) -> None:
        if self.orphaned:
            return
        stats = self._worker.stats
        steps, lateness = stats.take_observations()
        report = Report(slot, os.getpid(), dict(stats.counts), self._worker.in_flight,
                        steps.counts, steps.sum, lateness.counts, lateness.sum)
        if not _send(self._pipe, report):
            self.orphan("the supervisor's pipe is broken")


async def _report(start: WorkerStart, worker: Worker, control: _Control,
                  stop: asyncio.Event) -> None:
    """Report every interval; the reports are also the supervisor's proof that we live."""
    parent = os.getppid()
    while True:
        control.send_report(start.slot)
        # Under a forkserver our parent is the server, which exits with the supervisor.
        if os.getppid() != parent or not processes.exists(start.supervisor_pid):
            control.orphan("the supervisor process is gone")
        await asyncio.sleep(REPORT_INTERVAL_S)


def _send(pipe: Connection, message: Report | BootFailed) -> bool:
    try:
        pipe.send_bytes(encode(message))
    except (OSError, ValueError):
        return False
    return True
