"""The supervisor: one per node. It owns the node's identity, heartbeat, signals and HTTP
API, and keeps `settings.workers` worker processes alive.

Its main loop is a tick (woken early by signals, worker exits and pipe messages) that
acts on recorded signals, reaps exited workers (settling their claims at once, fenced:
see `supervisor.reaping`), kills hung ones, restarts the missing with backoff, and ends
when a stop has emptied every slot. Signals: see `supervisor.signals`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from orch8.api.node import ReportListener, WorkerReport
from orch8.config import Settings
from orch8.database import check_pooled
from orch8.engine.stats import Folded, process_stats
from orch8.ids import new_node_id
from orch8.store.nodes import Registration
from supervisor import http, metrics_dir, reaping, systemd
from supervisor.child import BOOT_FAILED_EXIT, WorkerStart
from supervisor.heartbeat import Heartbeat
from supervisor.phase import Phase
from supervisor.protocol import BootFailed, Drain, Hurry, ProtocolError, Report, decode
from supervisor.signals import SignalQueue
from supervisor.slots import WorkerSlot, worker_context

log = logging.getLogger("orch8.supervisor")

TICK_S = 0.25
# Workers end a stop by themselves within the drain timeout plus about a second, whatever
# their handlers do (a handler thread that cannot be stopped ends with its process). These
# graces only catch a worker whose event loop is blocked, or whose async handler ignores
# its cancellation: then it is killed outright.
DRAIN_GRACE_S = 5.0
STOP_GRACE_S = 5.0
HEARTBEAT_STOP_S = 10.0
# How long a hung worker has, after its SIGABRT, to print its stack and exit.
ABORT_GRACE_S = 2.0

EXIT_OK, EXIT_FAILED, EXIT_BOOT_FAILED = 0, 1, BOOT_FAILED_EXIT
# Counters the supervisor keeps itself; worker slots are numbered from 1.
SUPERVISOR_COUNTERS = ("released", "retried", "failed", "worker_deaths", "worker_restarts")
# While a dead worker's claims cannot be settled (the database is away), retry this often.
SETTLE_RETRY_S = 1.0


@dataclass(frozen=True)
class Background:
    """The supervisor's long-lived tasks besides its main loop."""

    heartbeat: asyncio.Task[None]
    listener: asyncio.Task[None]
    server: asyncio.Task[None]

    @property
    def tasks(self) -> tuple[asyncio.Task[None], ...]:
        return (self.heartbeat, self.listener, self.server)


class Supervisor:
    """Implements `orch8.api.node.NodeView` for the HTTP app."""

    def __init__(self, settings: Settings, dsn: str, address: str | None = None) -> None:
        self.settings = settings
        # Where the API listens: a socket bound before start-up (`http.listen`), or the bind.
        self.address = address or settings.bind
        self.node_id = settings.node_id or new_node_id()
        self.incarnation = uuid.uuid4()
        # Checked before each use: after a database restart a pooled connection is dead,
        # and the first request must not fail on it (`check_pooled`: no round trip unless
        # the server has closed the connection).
        self.pool = AsyncConnectionPool(dsn, min_size=1, max_size=settings.api_pool_size,
                                        open=False, kwargs={"autocommit": True},
                                        name="orch8-api",
                                        check=check_pooled)
        self.dsn = dsn
        # Before any worker starts: each inherits the directory and counts into it.
        self.metrics_dir = metrics_dir.create()
        # The supervisor's own counts (claims it releases), in a file of its own there.
        self.stats = process_stats()
        self._slots = [WorkerSlot(number) for number in range(1, settings.workers + 1)]
        self._phase = Phase.STARTING
        self._phase_since = time.monotonic()
        self._wake = asyncio.Event()
        # Set once the node has deregistered: the API and the drain listener end.
        self._stopped = asyncio.Event()
        # Set once every worker is gone: the heartbeat ends (a drain keeps it beating).
        self._beats_stop = asyncio.Event()
        self._signals = SignalQueue(self._wake)
        self._heartbeat = Heartbeat(settings, dsn, self)
        self._systemd = systemd.Notifier(settings, self._slots, self._heartbeat)
        self._listeners: list[ReportListener] = []
        # What the supervisor itself did (settled a dead worker's claims, restarted it),
        # counted like a worker's counters and published to the same listeners.
        self._counts: dict[str, int] = dict.fromkeys(SUPERVISOR_COUNTERS, 0)
        # Hung workers already sent SIGABRT (by pid): the next step is SIGKILL.
        self._aborted: set[int] = set()
        self._database_ok = False
        self._exit_code = EXIT_OK
        self.failure: str | None = None
        # Whether systemd (Type=notify) has been told the node is ready.
        self._announced = False

    # -- NodeView ---------------------------------------------------------------------

    def state(self) -> str:
        return "active" if self._phase is Phase.STARTING else self._phase.value

    def is_ready(self) -> bool:
        # One worker up is enough to serve: the API needs none, and the node claims with
        # whichever workers it has while the others restart.
        return (self._phase is Phase.ACTIVE and self._database_ok
                and any(slot.alive and slot.booted for slot in self._slots))

    def unready_reason(self) -> str:
        if self._phase is not Phase.ACTIVE:
            return self.state()
        if not self._database_ok:
            return "database unreachable"
        return "ready" if self.is_ready() else "no worker is up"

    def reports(self) -> list[WorkerReport]:
        return [slot.latest for slot in self._slots if slot.latest is not None]

    def add_report_listener(self, listener: ReportListener) -> None:
        self._listeners.append(listener)

    # -- HeartbeatOwner ----------------------------------------------------------------

    def is_draining(self) -> bool:
        return self._phase.leaving

    def summary(self) -> dict[str, Any]:
        """Counters of the current worker processes, stored with each heartbeat."""
        totals: dict[str, Any] = {"in_flight": 0, "workers_alive": 0, **self._counts}
        for slot in self._slots:
            if slot.latest is not None and slot.alive:
                totals["workers_alive"] += 1
                totals["in_flight"] += slot.latest.in_flight
                for name, count in slot.latest.counts.items():
                    totals[name] = totals.get(name, 0) + count
        return totals

    def count(self, counter: str, amount: int = 1) -> None:
        """Count something the supervisor did: in its metrics file and in its heartbeat."""
        if amount <= 0:
            return
        self._counts[counter] += amount
        self.stats.add(counter, amount)

    def on_database(self, reachable: bool) -> None:
        self._database_ok = reachable

    def on_drain_requested(self) -> None:
        if self._phase is Phase.ACTIVE:
            self.begin_drain("a drain was requested through the API")

    def on_new_incarnation(self, registration: Registration) -> None:
        # Workers of the old incarnation hold claims that are already fenced; stop them
        # now and let the reaper restart each slot under the new incarnation.
        log.warning("registered again as incarnation %s; restarting workers",
                    registration.incarnation)
        self.incarnation = registration.incarnation
        self.stats.add("released", registration.released)
        for slot in self._slots:
            slot.send(Hurry())

    def on_taken_over(self, holder: uuid.UUID) -> None:
        self.fail(f"node id {self.node_id} is now registered by another process "
                  f"(incarnation {holder}); two nodes must not share ORCH8_NODE_ID")

    # -- life -------------------------------------------------------------------------

    async def run(self) -> int:
        """Register, start the workers and the API, supervise until stopped; exit code."""
        loop = asyncio.get_running_loop()
        self._signals.install(loop)
        try:
            registration = await self._heartbeat.register(self.incarnation)
            self.stats.add("released", registration.released)
            self._database_ok = True
            await self.pool.open(wait=True, timeout=30)
            log.info("node %s registered (incarnation %s, %d workers)", self.node_id,
                     self.incarnation, len(self._slots))
            self._context, self._worker_environ = worker_context()
            background = self._start_background()
            self._set_phase(Phase.ACTIVE)
            await self._main_loop()
            await self._leave(background)
        finally:
            # Normally every worker is gone by now. If we got here through an error, kill
            # them: multiprocessing joins live children at exit, and ours would wait for a
            # pipe that only closes when we do.
            for slot in self._slots:
                slot.kill()
            self._signals.uninstall(loop)
            await self.pool.close()
            metrics_dir.remove(self.metrics_dir)
        return self._exit_code

    def _start_background(self) -> Background:
        background = Background(
            heartbeat=asyncio.create_task(self._heartbeat.run(self._beats_stop), name="heartbeat"),
            listener=asyncio.create_task(self._heartbeat.listen(self._stopped),
                                         name="drain-listener"),
            server=asyncio.create_task(http.serve(self, self.address, self._stopped),
                                       name="http"),
        )
        for task in background.tasks:
            task.add_done_callback(self._on_background_done)
        return background

    def _on_background_done(self, task: asyncio.Task[None]) -> None:
        # Every background task lives as long as the node; one that ends early (a bug, or
        # the HTTP server failing) must not leave a node running without it.
        if self._stopped.is_set() or self._beats_stop.is_set() or task.cancelled():
            return
        error = task.exception()
        self.fail(f"{task.get_name()} stopped: {error!r}" if error else
                  f"{task.get_name()} stopped unexpectedly")

    async def _main_loop(self) -> None:
        while True:
            for number in self._signals.take():
                self._handle_signal(number.name)
            await reaping.reap(self, self._slots)
            if self._finished():
                return  # checked after reaping, so every exit is logged and released
            self._murder_hung()
            self._enforce_grace()
            if self._phase is Phase.ACTIVE:
                await self._spawn_due()
            if not self._announced and self.is_ready():
                systemd.notify(f"READY=1\nSTATUS=node {self.node_id} ready")
                self._announced = True
            if self._announced:  # STATUS lines and watchdog pings follow READY=1
                self._systemd.tick(self.state(), self.summary())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except TimeoutError:
                pass

    def _finished(self) -> bool:
        return self._phase.leaving and all(slot.process is None for slot in self._slots)

    async def _leave(self, background: Background) -> None:
        """Every worker has exited: stop beating, deregister, then stop the API."""
        background.listener.cancel()
        self._beats_stop.set()
        await asyncio.wait([background.heartbeat], timeout=HEARTBEAT_STOP_S)
        try:
            released = await self._heartbeat.deregister()
            self.stats.add("released", released)
            log.info("node %s deregistered (released %d claims)", self.node_id, released)
        except Exception as error:  # the sweep of another node will release them
            log.error("could not deregister (%s); other nodes will sweep this one", error)
        finally:
            await self._heartbeat.close()
        self._stopped.set()
        await asyncio.wait([background.server], timeout=http.GRACEFUL_TIMEOUT_S + 3)
        for task in background.tasks:
            task.cancel()
        await asyncio.gather(*background.tasks, return_exceptions=True)

    # -- signals and stops ------------------------------------------------------------

    def _handle_signal(self, name: str) -> None:
        log.info("received %s while %s", name, self._phase.value)
        if self._phase is Phase.STOPPING:
            self._kill_all(f"{name} during a stop")
        elif name == "SIGTERM" and self._phase is Phase.ACTIVE:
            self.begin_drain("SIGTERM")
        else:
            self.stop_now(name)

    def begin_drain(self, reason: str) -> None:
        """Stop claiming, let in-flight steps finish, then leave (graceful)."""
        log.info("draining (%s): no new claims; waiting for in-flight steps", reason)
        self._set_phase(Phase.DRAINING)
        for slot in self._slots:
            slot.send(Drain())
        self._heartbeat.wake()  # write state 'draining' now, not at the next beat

    def stop_now(self, reason: str) -> None:
        """Cancel what runs, release its claims, leave."""
        log.warning("stopping now (%s)", reason)
        self._set_phase(Phase.STOPPING)
        for slot in self._slots:
            slot.send(Hurry())
        self._heartbeat.wake()

    def fail(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        """A condition the node cannot run with: stop now and exit non-zero."""
        if self.failure is None:
            log.error("%s", message)
            self.failure, self._exit_code = message, exit_code
        if self._phase is not Phase.STOPPING:
            self.stop_now("fatal error")

    def _set_phase(self, phase: Phase) -> None:
        self._phase, self._phase_since = phase, time.monotonic()
        self._wake.set()
        if phase.leaving:
            systemd.notify(f"STOPPING=1\nSTATUS=node {self.node_id} {phase.value}")

    def _kill_all(self, reason: str) -> None:
        log.warning("killing every worker (%s)", reason)
        for slot in self._slots:
            slot.kill()

    def _enforce_grace(self) -> None:
        waited = time.monotonic() - self._phase_since
        if self._phase is Phase.DRAINING:
            if waited > self.settings.drain_timeout_s + DRAIN_GRACE_S:
                self._kill_all("drain timeout passed")
        elif self._phase is Phase.STOPPING and waited > STOP_GRACE_S:
            self._kill_all("workers did not stop in time")

    # -- workers ----------------------------------------------------------------------

    async def _spawn_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if not slot.due_to_start(now):
                continue  # running, waiting to restart, or exited and not reaped yet
            if slot.pending_release is not None and not await reaping.release(self, slot):
                # Never start a slot while its previous claims are still held; wait rather
                # than retry every tick while the database is away.
                slot.restart_at = now + SETTLE_RETRY_S
                continue
            if slot.spawned:
                self.count("worker_restarts")
            self._spawn(slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        start = WorkerStart(self.settings, self.dsn, self.node_id, self.incarnation,
                            slot.number, supervisor_pid=os.getpid(),
                            metrics_dir=self.metrics_dir, environ=self._worker_environ)
        slot.spawn(self._context, start)
        loop = asyncio.get_running_loop()
        assert slot.process is not None and slot.pipe is not None
        loop.add_reader(slot.process.sentinel, self._wake.set)
        loop.add_reader(slot.pipe.fileno(), self._on_pipe, slot)

    def forget_fds(self, slot: WorkerSlot) -> None:
        """Stop watching a slot's process and pipe (before reaping it)."""
        loop = asyncio.get_running_loop()
        if slot.process is not None:
            loop.remove_reader(slot.process.sentinel)
        if slot.pipe is not None:
            loop.remove_reader(slot.pipe.fileno())

    def _on_pipe(self, slot: WorkerSlot) -> None:
        assert slot.pipe is not None
        try:
            message = decode(slot.pipe.recv_bytes())
        except (EOFError, OSError):
            # The worker is exiting; its sentinel fires next and the reaper takes over.
            asyncio.get_running_loop().remove_reader(slot.pipe.fileno())
            self._wake.set()
            return
        except ProtocolError as error:
            log.error("worker %d: %s", slot.number, error)
            return
        slot.last_heard_at = time.monotonic()
        if isinstance(message, Report):
            self._on_report(slot, message)
        elif isinstance(message, BootFailed):
            self.fail(f"worker {slot.number} failed at boot: {message.message}",
                      EXIT_BOOT_FAILED)

    def _on_report(self, slot: WorkerSlot, message: Report) -> None:
        slot.booted = True
        report = WorkerReport(slot.number, message.pid, True, message.counts,
                              message.in_flight,
                              Folded(message.step_buckets, message.step_seconds_sum),
                              Folded(message.lateness_buckets, message.lateness_seconds_sum))
        slot.latest = report
        for listener in self._listeners:
            _call_listener(listener, report)

    def _murder_hung(self) -> None:
        # As gunicorn does: SIGABRT first, so the worker's faulthandler prints where it
        # hung; SIGKILL if it is still there ABORT_GRACE_S later.
        now = time.monotonic()
        for slot in self._slots:
            silent = now - slot.last_heard_at
            if not slot.alive or silent <= self.settings.worker_timeout_s:
                continue
            assert slot.process is not None and slot.process.pid is not None
            pid = slot.process.pid
            if pid not in self._aborted:
                log.error("worker %d (pid %s) sent nothing for %.0fs; aborting it (its stack "
                          "follows)", slot.number, pid, silent)
                self._aborted.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
                slot.last_heard_at = now - self.settings.worker_timeout_s + ABORT_GRACE_S
            else:
                log.error("worker %d (pid %s) did not exit on SIGABRT; killing it",
                          slot.number, pid)
                self._aborted.discard(pid)
                slot.kill()
                slot.last_heard_at = now  # one kill per timeout, not one per tick

    @property
    def phase(self) -> Phase:
        return self._phase


def _call_listener(listener: Callable[[WorkerReport], None], report: WorkerReport) -> None:
    try:
        listener(report)
    except Exception:  # a metrics bug must not take the supervisor down
        log.exception("report listener failed")
