"""Group commit of step successes: one statement for many instances.

Executors hand a `StepDone` to `finish()` and wait for the answer (did the fence hold?).
One background task writes whatever has gathered since its last write, so under load each
statement carries many outcomes, and when idle an outcome waits at most `linger_s`.
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
        self._pending: list[tuple[StepDone, asyncio.Future[bool]]] = []
        self._arrived = asyncio.Event()

    async def finish(self, done: StepDone) -> bool:
        """Record one step's success; True if applied, False if the claim was lost."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((done, future))
        self._arrived.set()
        return await future

    async def run(self) -> None:
        """Write batches until cancelled; a failed write fails that batch's callers only."""
        while True:
            await self._arrived.wait()
            if self._linger_s:
                await asyncio.sleep(self._linger_s)
            batch = self._pending[:self._max_batch]
            self._pending = self._pending[self._max_batch:]
            if not self._pending:
                self._arrived.clear()
            await self._write(batch)

    async def _write(self, batch: list[tuple[StepDone, asyncio.Future[bool]]]) -> None:
        try:
            async with self._pool.connection() as conn:
                applied: set[uuid.UUID] = await finish_steps(conn, [done for done, _ in batch])
        except Exception as error:  # the callers decide whether to try again
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for done, future in batch:
            if not future.done():
                future.set_result(done.id in applied)
