"""Group commit of step successes: one statement for many instances.

Executors hand a `StepDone` to `finish()` and wait for the answer (did the fence hold?).
One background task writes whatever has gathered since its last write, so under load each
statement carries many outcomes, and when idle an outcome waits at most `linger_s`.

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

from orch8.store.claims import StepDone, finish_steps

log = logging.getLogger("orch8.engine.committer")


class StepCommitter:
    def __init__(self, pool: AsyncConnectionPool, linger_s: float, max_batch: int = 500,
                 on_refused: Callable[[int], None] | None = None) -> None:
        self._pool = pool
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._on_refused = on_refused
        self._pending: list[tuple[StepDone, asyncio.Future[bool]]] = []
        self._arrived = asyncio.Event()
        # Held while a batch is taken and written: `flush()` waits for a write in flight.
        self._writing = asyncio.Lock()

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
            await self._write_next()

    async def flush(self) -> None:
        """Write every outcome handed over so far, and wait for a write in flight."""
        while self._pending:
            await self._write_next()
        async with self._writing:
            pass

    async def _write_next(self) -> None:
        async with self._writing:
            batch = self._pending[:self._max_batch]
            self._pending = self._pending[self._max_batch:]
            if not self._pending:
                self._arrived.clear()
            if batch:
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
        refused = 0
        for done, future in batch:
            refused += done.id not in applied
            if not future.done():
                future.set_result(done.id in applied)
        if refused and self._on_refused is not None:
            self._on_refused(refused)
