"""The claim loop of one worker process.

Every `tick_interval_ms`, or at once when a NOTIFY says work arrived or a slot frees up
while a backlog exists, it takes up to `min(batch_size, free slots)` due instances in a
held claim (`Executor.run_locked`): their rows locked in one transaction, each one's
steps run there while each returns at once, what they came to written before the commit.
What must wait (a coroutine that suspended, a plain function, a delay, a rate limit, a
failure, a retry) comes out of that transaction claimed, and runs on as one batch, in one
task. Keyed candidates are claimed after it, into their keys' slots. Polling is
the source of truth; NOTIFY only shortens the wait. While a backlog lasts (the last
claim was full), the next held claim is sent with the previous one's write and commit,
one round trip per batch (`_more`); and for batches that run under a claim, the write
that records a round's outcomes also claims the next batch, as many as that round frees
(`reserve`, `claimed`): one statement per batch instead of two.

Stopping: `stop` set -> stop claiming; in-flight instances finish the step they are in and
release the rest of their run; after `drain_timeout_s` (or at once after `hurry()`), what
still runs is cancelled and its claims released (fenced), so nothing waits for staleness.
A plain (non-async) handler cannot be cancelled: its thread runs on. Its claim is then
kept, not released, so that no other worker can start the step while it still runs here;
the process must exit, and whoever watches it releases the claim once it is gone (the
supervisor does, its `tracker` tells which).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from orch8.config import Settings
from orch8.engine.calls import Tracker
from orch8.engine.committer import StepCommitter
from orch8.engine.executor import Executor, Held, HeldConflict, Run
from orch8.engine.limits import LimitWatch
from orch8.engine.stats import WorkerStats
from orch8.events import wait_any
from orch8.handlers.registry import Registry, default_registry
from orch8.store import claims, nodes
from orch8.store.claims import Claimed, Owner, Refilled, StepDone
from orch8.store.concurrency import SlotBackstop

log = logging.getLogger("orch8.engine.worker")
# A claimed instance's lateness, read in C (no Python frame per instance).
_LATENESS = operator.attrgetter("lateness_s")

# How long a stopping worker waits for its cancelled runs to end (an async handler may
# catch the cancellation and carry on, or block the loop).
CANCEL_GRACE_S = 1.0
# How long a starting worker waits for its LISTEN before its first claim (it takes a
# connection's set-up, a few ms; past this, polling alone finds the work until it comes).
LISTEN_WAIT_S = 1.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        dsn: str,
        owner: Owner,
        registry: Registry | None = None,
        stats: WorkerStats | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.settings = settings
        self.owner = owner
        self.stats = stats or WorkerStats()
        self._dsn = dsn
        self._registry = registry or default_registry
        # Each running batch, and how many of its instances are still in this worker's hands.
        self._running: dict[asyncio.Task[None], _Batch] = {}
        self._in_flight = 0
        # Slots promised to claims in flight (the claim loop's, or a write's: `reserve`),
        # and of those, the claim loop's (`_hold`).
        self._reserved = 0
        self._holding = 0
        self._stop: asyncio.Event | None = None
        self._executor: Executor | None = None
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()  # (set once, by the first LISTEN)
        self._hurry = asyncio.Event()
        self._draining = False
        self._last_claim_full = False
        # Claims whose run ended in an error (a long database outage): given back next tick.
        self._orphans: list[Claimed] = []
        # A claim failed: it may have committed with its reply lost (see
        # `claims.RELEASE_OWNER`), so what this worker does not hold is given back first.
        self._claim_unsure = False
        self._started_at: datetime | None = None  # the database's clock at this run's start
        # Where each handler call is marked while it runs (the supervisor's table), which
        # also tells whose handler code still runs in this process (see the module doc).
        self._tracker = tracker

    @property
    def _refill_at(self) -> int:
        return max(1, min(self.settings.batch_size, self.settings.max_in_flight) // 2)

    @property
    def in_flight(self) -> int:
        """Instances this worker is running now."""
        return self._in_flight

    @property
    def free_slots(self) -> int:
        return self.settings.max_in_flight - self.in_flight - self._reserved

    def hurry(self) -> None:
        """Cut a graceful stop short: cancel what still runs and release it now."""
        self._hurry.set()
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and execute until `stop` is set, then stop gracefully."""
        pool = self.new_pool()
        await pool.open(wait=True, timeout=30)
        async with pool.connection() as conn:
            self._started_at = (await (await conn.execute("SELECT now()")).fetchall())[0][0]
        threads = ThreadPoolExecutor(max_workers=min(64, self.settings.max_in_flight),
                                     thread_name_prefix="orch8-handler")
        committer = StepCommitter(pool, self, self.settings.commit_linger_ms / 1000,
                                  self.settings.commit_max_batch,
                                  lambda refused: self.stats.add("fenced_rejected", refused))
        limits = LimitWatch(pool)
        self._stop = stop
        executor = Executor(pool, committer, self._registry, self.stats, threads,
                            lambda: self._draining, limits, self._tracker)
        self._executor = executor  # for the batches a write claims (`claimed`)
        # Know the rate-limited handlers before the first step runs.
        with contextlib.suppress(psycopg.OperationalError, OSError):
            await limits.run_once()
        background = [
            asyncio.create_task(committer.run(), name="committer"),
            asyncio.create_task(self._listen(stop), name="listen"),
            asyncio.create_task(limits.run(stop), name="limits"),
            asyncio.create_task(SlotBackstop(pool).run(stop), name="slot-backstop"),
        ]
        try:
            # The first claim finds the work committed before it; work committed after it
            # must find this worker listening, or its NOTIFY is lost and it waits a tick.
            await wait_any(stop, self._listening, timeout=LISTEN_WAIT_S)
            await self._claim_loop(pool, executor, stop)
            await self._finish(pool, committer)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            threads.shutdown(wait=False, cancel_futures=True)
            await pool.close()

    def new_pool(self) -> AsyncConnectionPool:
        """This worker's connections (not yet open), each made ready for held claims
        before the pool hands it out (`claims.warm_up`)."""
        return AsyncConnectionPool(
            self._dsn, min_size=2, max_size=8, open=False,
            kwargs={"autocommit": True,
                    "application_name": nodes.worker_session(self.owner.incarnation)},
            name=f"orch8-worker-{self.owner.slot}", configure=self._warm_up,
        )

    async def _warm_up(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await claims.warm_up(conn, self.settings.batch_size)
        except psycopg.OperationalError:
            raise  # the connection is bad: the pool drops it and makes another
        except psycopg.Error as error:
            # Only a slower first claim is lost; that claim reports the real trouble.
            log.warning("could not make a new connection ready for claims: %s", error)

    async def run_once(self, pool: AsyncConnectionPool, executor: Executor) -> None:
        """One claim, or a run of them while a backlog lasts: take what is due (up to the
        free slots) and start it."""
        if self._orphans:
            await self._release_orphans(pool)
        if self._claim_unsure and not self._reserved:
            # (With a write's claim in flight, its rows could be taken for unknown ones.)
            await self._release_unknown(pool)
        limit = min(self.settings.batch_size, self.free_slots)
        if limit <= 0 or self._draining:
            return
        self._hold(limit)
        try:
            async with pool.connection() as conn:
                held = await executor.run_locked(conn, self.owner, limit, self._more,
                                                 lambda held: self._taken(held, executor))
                # (Still reserved: the keyed candidates' room, see `_more`.)
                claimed = (await claims.claim_keyed(conn, self.owner, self._holding)
                           if held.keyed else [])
        except (psycopg.OperationalError, OSError):
            self._claim_unsure = True
            raise
        finally:
            self._hold(0)
        self._start(claimed, executor)

    def _more(self, held: Held) -> int:
        """The limit of the held claim to lock with `held`'s commit (`run_locked`), 0 for
        none: another while a backlog lasts and slots are free, never while stopping or
        while claims may be unknown, nor with keyed candidates to seat first."""
        self._last_claim_full = held.full
        if held.keyed:
            self._hold(held.limit)  # room for its instances that go on, and the keyed ones
            return 0
        self._hold(len(held.going_on))  # promised until taken
        if (not held.full or self._draining or self._orphans or self._claim_unsure
                or self._stop is None or self._stop.is_set()):
            return 0
        limit = min(self.settings.batch_size, self.free_slots)
        if limit < self._refill_at:
            return 0
        self._hold(len(held.going_on) + limit)
        return limit

    def _taken(self, held: Held, executor: Executor) -> None:
        """A held claim committed: run what it claimed (counted with what it locked)."""
        self._hold(self._holding - len(held.going_on))
        self._count_claimed(held.locked)
        self._start_held(held.going_on, executor)

    def _hold(self, count: int) -> None:
        """Set the slots the claim loop's claims in flight hold promised (`_reserved`)."""
        self._reserved += count - self._holding
        self._holding = count

    def reserve(self, finishing: Sequence[StepDone]) -> int:
        """How many to claim with the write that records `finishing` (see the committer):
        with a backlog, what that write frees, a batch at most; never while stopping or
        while claims may be unknown (a failed claim or write). Those slots are promised
        until `claimed` or `lost`."""
        if (not self._last_claim_full or self._draining or self._orphans
                or self._claim_unsure or self._stop is None or self._stop.is_set()):
            return 0
        leaving = sum(1 for done in finishing if done.last)
        limit = min(self.settings.batch_size, self.free_slots + leaving)
        if limit < self._refill_at:
            return 0
        self._reserved += limit
        return limit

    def claimed(self, refilled: Refilled, reserved: int) -> None:
        """A write claimed `refilled.claimed` (of `reserved`): run them as a batch."""
        self._reserved -= reserved
        self._last_claim_full = len(refilled.claimed) == reserved
        if refilled.keyed:
            self._wake.set()  # keyed candidates: the claim loop seats or parks them
        assert self._executor is not None
        self.stats.add("claimed_with_finish", len(refilled.claimed))
        self._start(refilled.claimed, self._executor)

    def lost(self, reserved: int) -> None:
        """A write that also claimed failed: its claims may have committed unseen."""
        self._reserved -= reserved
        self._claim_unsure = True
        self._last_claim_full = False
        self._wake.set()

    def _start(self, claimed: list[Claimed], executor: Executor) -> None:
        """Count a claim and run what it took as one batch."""
        self._count_claimed(claimed)
        if claimed:
            self._run(claimed, lambda left: executor.run_batch(claimed, left))

    def _start_held(self, going_on: list[Run], executor: Executor) -> None:
        """Run what a held claim claimed (counted with the held claim)."""
        if going_on:
            self._run([run.claimed for run in going_on],
                      lambda left: executor.resume(going_on, left))

    def _count_claimed(self, claimed: list[Claimed]) -> None:
        self.stats.add("claimed", len(claimed))
        # (Never negative: a claim takes only rows due by its transaction's `now()`.)
        self.stats.claim_lateness_seconds.observe_each(map(_LATENESS, claimed))

    def _run(self, claimed: list[Claimed],
             run: Callable[[Callable[[int], None]], Coroutine[Any, Any, None]]) -> None:
        """Run claimed instances in one task, as one batch in this worker's hands."""
        batch = _Batch(claimed, len(claimed))
        self._in_flight += len(claimed)
        task = asyncio.create_task(run(batch.left_callback(self._left)),
                                   name=f"batch-{claimed[0].id}")
        self._running[task] = batch
        task.add_done_callback(self._on_done)

    async def _claim_loop(self, pool: AsyncConnectionPool, executor: Executor,
                          stop: asyncio.Event) -> None:
        tick = self.settings.tick_interval_ms / 1000
        while not stop.is_set():
            # Cleared before the claim, not after: a NOTIFY (or a freed slot) that arrives
            # while the claim is running must still cut the next wait short.
            self._wake.clear()
            try:
                await self.run_once(pool, executor)
            except (psycopg.OperationalError, OSError, HeldConflict) as error:
                log.warning("claim failed (%s); retrying next tick", error)
                self._last_claim_full = False
            if self._last_claim_full and self.free_slots >= self._refill_at:
                continue  # a backlog: claim again straight away
            await wait_any(stop, self._wake, timeout=tick)

    def _left(self, count: int) -> None:
        """`count` instances left this worker's hands."""
        self._in_flight -= count
        # With a backlog, claim again once half a batch of slots is free: waking for every
        # single free slot would turn one claim of 50 into 50 claims of 1.
        if not self._in_flight or (self._last_claim_full and self.free_slots >= self._refill_at):
            self._wake.set()

    def _on_done(self, task: asyncio.Task[None]) -> None:
        batch = self._running.pop(task)
        if not task.cancelled() and task.exception() is not None:
            # Only a bug or a lasting database outage gets here. The claims must not stay
            # with a live worker forever: release them (fenced: those that already left
            # are untouched) on the next tick.
            log.error("batch of %d: run ended with %r", len(batch.claims), task.exception())
            self._orphans += batch.claims
        if batch.remaining:
            self._left(batch.take_remaining())

    async def _release_unknown(self, pool: AsyncConnectionPool) -> None:
        """Give back this slot's claims that a failed claim may have made unseen."""
        assert self._started_at is not None
        held = [c.id for batch in self._running.values() for c in batch.claims]
        held += [c.id for c in self._orphans]
        async with pool.connection() as conn:
            released = await claims.release_unknown(conn, self.owner, self._started_at, held)
        self._claim_unsure = False
        if released:
            self.stats.add("released", released)
            log.warning("released %d instances claimed by a claim whose reply was lost",
                        released)

    async def _release_orphans(self, pool: AsyncConnectionPool) -> None:
        orphans, self._orphans = self._orphans, []
        try:
            async with pool.connection() as conn:
                self.stats.add("released", await claims.release_unstarted(conn, orphans))
        except (psycopg.OperationalError, OSError):
            self._orphans = orphans + self._orphans  # still unreachable: next tick

    async def _finish(self, pool: AsyncConnectionPool, committer: StepCommitter) -> None:
        """Graceful stop: let in-flight steps end, then release whatever is left."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_s
        if self._running:
            log.info("stopping: waiting for %d in-flight instances", len(self._running))
        while self._running and not self._hurry.is_set() and loop.time() < deadline:
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait({*self._running, hurry}, timeout=deadline - loop.time(),
                               return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
        left = dict(self._running)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=CANCEL_GRACE_S)
        # Outcomes of steps that finished are written (or refused, and counted) before the
        # claims go back: a finished step must not run again because we stopped.
        await committer.flush()
        # The fence leaves alone those of a batch that already completed or moved on.
        unfinished, kept = list(self._orphans), list[Claimed]()
        still_running = self._tracker.running_instances() if self._tracker else ()
        for task, batch in left.items():
            for instance in batch.claims:
                stopped = task.done() and instance.id not in still_running
                (unfinished if stopped else kept).append(instance)
        if kept:
            log.warning("stopping: %d handlers still running cannot be stopped; their claims "
                        "go back once this process has exited", len(kept))
        if unfinished:
            async with pool.connection() as conn:
                released = await claims.release_unstarted(conn, unfinished)
            self.stats.add("released", released)
            log.info("stopping: released %d unfinished instances", released)

    async def _listen(self, stop: asyncio.Event) -> None:
        """Set the wake event on every NOTIFY; reconnect quietly if the connection drops."""
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True) as conn:
                    await conn.execute("LISTEN orch8_work")
                    self._listening.set()
                    async for _ in conn.notifies():
                        self._wake.set()
            except (psycopg.OperationalError, OSError) as error:
                log.debug("listen connection lost (%s); polling meanwhile", error)
                await asyncio.sleep(1.0)



class _Batch:
    """One claimed batch in a worker's hands: its claims, and how many are still held."""

    def __init__(self, claims: list[Claimed], remaining: int) -> None:
        self.claims = claims
        self.remaining = remaining

    def left_callback(self, worker_left: Callable[[int], None]) -> Callable[[int], None]:
        def left(count: int) -> None:
            self.remaining -= count
            worker_left(count)

        return left

    def take_remaining(self) -> int:
        remaining, self.remaining = self.remaining, 0
        return remaining
