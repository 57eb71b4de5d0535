"""Group commit of step successes: one statement for many instances.

Executors hand the step successes of a round to `finish_many()` and wait for the answer
(whose fence refused them? almost always nobody's). One background task writes whatever
has gathered since its last write, so under load each statement carries many rounds'
outcomes, and when idle an outcome waits at most `linger_s`. One waiter per round, not
per instance: the cost per instance is an entry in a list.

The committer counts the outcomes the fence refused itself, rather than its callers: a
caller cancelled while its outcome waits (a worker told to stop now) is gone, but the
outcome is still written, and whether it applied is still counted. A stopping worker
calls `flush()` before it gives its claims back, so a finished step is recorded rather
than run a second time elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from psycopg_pool import AsyncConnectionPool

from orch8.store.claims import StepDone, refused_steps

log = logging.getLogger("orch8.engine.committer")

Entry = tuple[list[StepDone], "asyncio.Future[set[uuid.UUID]]"]


class StepCommitter:
    def __init__(self, pool: AsyncConnectionPool, linger_s: float, max_batch: int = 500,
                 on_refused: Callable[[int], None] | None = None) -> None:
        self._pool = pool
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._on_refused = on_refused
        self._pending: list[Entry] = []
        self._arrived = asyncio.Event()
        # Held while a batch is taken and written: `flush()` waits for a write in flight.
        self._writing = asyncio.Lock()

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
        while True:
            await self._arrived.wait()
            if self._linger_s:
                await asyncio.sleep(self._linger_s)
            await self._write_next()

    async def flush(self) -> None:
        """Write every outcome handed over so far, and wait for a write in flight."""
        while self._pending:
            await self._write_next()
        async with self._writing:
            pass

    async def _write_next(self) -> None:
        async with self._writing:
            batch = self._take()
            if not self._pending:
                self._arrived.clear()
            if batch:
                await self._write(batch)

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
        try:
            async with self._pool.connection() as conn:
                refused = await refused_steps(conn, [d for done, _ in batch for d in done])
        except Exception as error:  # the callers decide whether to try again
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for done, future in batch:
            if not future.done():
                future.set_result({d.id for d in done if d.id in refused} if refused else set())
        if refused and self._on_refused is not None:
            self._on_refused(len(refused))
