"""Group commit of step successes: one statement for many instances.

Executors hand the step successes of a round to `finish_many()` and wait for the answer
(whose fence refused them? almost always nobody's). One background task writes whatever
has gathered since its last write, so under load each statement carries many rounds'
outcomes, and when idle an outcome waits at most `linger_s`. One waiter per round, not
per instance: the cost per instance is an entry in a list.

The committer counts and logs the outcomes the fence refused itself, rather than its
callers: a caller cancelled while its outcome waits (a worker told to stop now) is gone,
but the outcome is still written, and whether it applied is still counted and, if
refused, logged. A stopping worker calls `flush()` before it gives its claims back, so a
finished step is recorded rather than run a second time elsewhere.

Through its `Refill` (the worker), a write may also claim the worker's next batch in the same
statement (`claims.FINISH_AND_CLAIM`): while a backlog lasts, a batch then costs one round
trip instead of two. The worker decides, at each write, whether and how much.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from psycopg_pool import AsyncConnectionPool

from orch8.store.claims import (
    Owner,
    Refilled,
    StepDone,
    finish_and_claim,
    refused_steps,
    rolled_back,
)

log = logging.getLogger("orch8.engine.committer")

Entry = tuple[list[StepDone], "asyncio.Future[set[uuid.UUID]]"]

# Writes in flight at once, each on its own connection. With one, a worker's batches took
# turns at the database: while one round's outcomes were written, the next round's (and,
# with a backlog, its next claim) waited, and PostgreSQL sat idle on the other core.
WRITERS = 2
# Times a write that PostgreSQL rolled back whole (`claims.rolled_back`) is sent again at
# once, before it fails like any other write.
RESENDS = 3


class Refill(Protocol):
    """Who claims with a write: the worker whose outcomes are written."""

    owner: Owner

    def reserve(self, finishing: Sequence[StepDone]) -> int:
        """How many to claim with the write of `finishing` (0: none); that many slots
        stay promised until `claimed` or `lost` is called with the same number."""

    def claimed(self, refilled: Refilled, reserved: int) -> None:
        """The write committed: here is what it claimed (before its callers hear)."""

    def lost(self, reserved: int) -> None:
        """The write failed: it may have committed, claims and all, with its reply lost."""


class StepCommitter:
    def __init__(self, pool: AsyncConnectionPool, refill: Refill, linger_s: float,
                 max_batch: int = 500, on_refused: Callable[[int], None] | None = None) -> None:
        self._pool = pool
        self._refill = refill
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._on_refused = on_refused
        self._pending: list[Entry] = []
        self._arrived = asyncio.Event()
        # One permit per write in flight; `flush()` waits for those too.
        self._writers = asyncio.Semaphore(WRITERS)
        self._writes: set[asyncio.Task[None]] = set()

    async def finish_many(self, done: list[StepDone]) -> set[uuid.UUID]:
        """Record step successes; return the ids refused (their claims were lost)."""
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(done), self._max_batch):
            future: asyncio.Future[set[uuid.UUID]] = loop.create_future()
            self._pending.append((done[start:start + self._max_batch], future))
            futures.append(future)
        self._arrived.set()
        if len(futures) == 1:
            return await futures[0]
        return set().union(*await asyncio.gather(*futures))

    async def run(self) -> None:
        """Write batches until cancelled; a failed write fails that batch's callers only."""
        try:
            while True:
                await self._arrived.wait()
                if self._linger_s:
                    await asyncio.sleep(self._linger_s)
                await self._writers.acquire()
                batch = self._next()
                if not batch:
                    self._writers.release()
                    continue
                write = asyncio.create_task(self._write_and_release(batch))
                self._writes.add(write)
                write.add_done_callback(self._writes.discard)
        finally:
            for write in self._writes:  # after `flush()`: nobody waits for them
                write.cancel()

    async def flush(self) -> None:
        """Write every outcome handed over so far, and wait for the writes in flight."""
        while self._pending:
            async with self._writers:
                batch = self._next()
                if batch:
                    await self._write(batch)
        if self._writes:
            await asyncio.wait(set(self._writes))

    async def _write_and_release(self, batch: list[Entry]) -> None:
        try:
            await self._write(batch)
        finally:
            self._writers.release()

    def _next(self) -> list[Entry]:
        batch = self._take()
        if not self._pending:
            self._arrived.clear()
        return batch

    def _take(self) -> list[Entry]:
        """Whole entries, up to `max_batch` outcomes (always at least one entry)."""
        count = taken = 0
        for done, _ in self._pending:
            if taken and count + len(done) > self._max_batch:
                break
            count += len(done)
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return batch

    async def _write(self, batch: list[Entry]) -> None:
        done = [d for entries, _ in batch for d in entries]
        limit = self._refill.reserve(done)
        try:
            refused, refilled = await self._send(done, limit)
        except BaseException as error:
            if limit:
                self._refill.lost(limit)
            if not isinstance(error, Exception):
                raise  # cancelled: the worker is going away
            for _, future in batch:  # the callers decide whether to try again
                if not future.done():
                    future.set_exception(error)
            return
        if refilled is not None:
            self._refill.claimed(refilled, limit)  # before its callers hear: see `Refill`
        self._answer(batch, refused)

    def _answer(self, batch: list[Entry], refused: set[uuid.UUID]) -> None:
        """Tell each caller which of its outcomes the fence refused; count and log those
        here, whether or not their caller is still there to hear."""
        for entries, future in batch:
            lost: set[uuid.UUID] = set()
            if refused:  # (almost never: no pass over the entries otherwise)
                for d in entries:
                    if d.id in refused:
                        lost.add(d.id)
                        log.warning("instance %s: claim lost before step %s was recorded; "
                                    "dropped", d.id, d.step_id)
            if not future.done():  # (a cancelled caller's is done)
                future.set_result(lost)
        if refused and self._on_refused is not None:
            self._on_refused(len(refused))

    async def _send(self, done: list[StepDone],
                    limit: int) -> tuple[set[uuid.UUID], Refilled | None]:
        """The write: with `limit`, the claim of as many rides along. A write PostgreSQL
        rolled back to break a deadlock applied nothing, so it goes again at once, claim
        and all: neither its callers nor the worker's claim accounting hear of it."""
        resends = 0
        while True:
            try:
                async with self._pool.connection() as conn:
                    if not limit:
                        return await refused_steps(conn, done), None
                    refilled = await finish_and_claim(conn, done, self._refill.owner, limit)
                    return refilled.refused, refilled
            except Exception as error:
                if resends == RESENDS or not rolled_back(error):
                    raise
                resends += 1
                log.warning("a write of %d step outcomes was rolled back (%s); sending it "
                            "again", len(done), str(error).splitlines()[0])
