"""Group commit of step successes: one statement for many instances.

Executors hand the step successes of a round to `finish_many()` and wait for the answer
(whose fence held?). One background task writes whatever has gathered since its last
write, so under load each statement carries many rounds' outcomes, and when idle an
outcome waits at most `linger_s`. One waiter per round, not per instance: the cost per
instance is an entry in a list.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from psycopg_pool import AsyncConnectionPool

from orch8.store.claims import StepDone, finish_steps

log = logging.getLogger("orch8.engine.committer")


class StepCommitter:
    def __init__(self, pool: AsyncConnectionPool, linger_s: float, max_batch: int = 500) -> None:
        self._pool = pool
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._pending: list[tuple[list[StepDone], asyncio.Future[set[uuid.UUID]]]] = []
        self._arrived = asyncio.Event()

    async def finish_many(self, done: list[StepDone]) -> set[uuid.UUID]:
        """Record step successes; return the ids applied (the others' claims were lost)."""
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
            batch = self._take()
            if not self._pending:
                self._arrived.clear()
            await self._write(batch)

    def _take(self) -> list[tuple[list[StepDone], asyncio.Future[set[uuid.UUID]]]]:
        """Whole entries, up to `max_batch` outcomes (always at least one entry)."""
        count = taken = 0
        for done, _ in self._pending:
            if taken and count + len(done) > self._max_batch:
                break
            count += len(done)
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return batch

    async def _write(
        self, batch: list[tuple[list[StepDone], asyncio.Future[set[uuid.UUID]]]]
    ) -> None:
        try:
            async with self._pool.connection() as conn:
                applied = await finish_steps(conn, [d for done, _ in batch for d in done])
        except Exception as error:  # the callers decide whether to try again
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for _, future in batch:
            if not future.done():
                future.set_result(applied)
