"""`LimitWatch`: a worker's view of the limits, kept current in the background.

Two jobs at one pace (every `interval_s`):
- re-read which handlers have a rate limit, so that a step whose handler has none pays
  no query at all (the executor asks `applies()`, a set lookup);
- run the concurrency-slot backstop (`concurrency.wake_stranded`) for the rare wake-up
  the triggers could not deliver.

A limit set or deleted therefore takes effect within `interval_s` on every node.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg
from psycopg_pool import AsyncConnectionPool

from orch8.store import concurrency, rate_limits

log = logging.getLogger("orch8.engine.limits")

INTERVAL_S = 2.0


class LimitWatch:
    def __init__(self, pool: AsyncConnectionPool, interval_s: float = INTERVAL_S) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._limited: frozenset[str] = frozenset()

    def applies(self, handler: str) -> bool:
        """Whether calls of `handler` must be admitted by its rate limit."""
        return handler in self._limited

    async def run_once(self) -> None:
        """Refresh the limited handlers and wake stranded slot waiters, once."""
        async with self._pool.connection() as conn:
            self._limited = await rate_limits.limited_handlers().run_async(conn)
            woken = await concurrency.wake_stranded().run_async(conn)
        if woken:
            log.info("woke waiters of %d concurrency keys with a free slot", woken)

    async def run(self, stop: asyncio.Event) -> None:
        """`run_once` every `interval_s` until `stop`; a database error waits a round."""
        while not stop.is_set():
            try:
                await self.run_once()
            except (psycopg.OperationalError, OSError) as error:
                log.warning("limit refresh failed (%s); keeping the last view", error)
            try:
                await asyncio.wait_for(stop.wait(), self._interval_s)
            except TimeoutError:
                pass
