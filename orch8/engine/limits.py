"""`LimitWatch`: a worker's view of the rate limits, kept current in the background.

Every `interval_s` it re-reads which handlers have a rate limit, so that a step whose
handler has none pays no query at all (the executor asks `applies()`, a set lookup); a
limit set or deleted therefore takes effect within `interval_s` on every node. It also
stamps the real start of each admitted call (`stamper`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from orch8.store import rate_limits

log = logging.getLogger("orch8.engine.limits")

INTERVAL_S = 2.0


class LimitWatch:
    def __init__(self, pool: AsyncConnectionPool, interval_s: float = INTERVAL_S) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._limited: frozenset[str] = frozenset()
        self._stamping: set[asyncio.Task[None]] = set()

    def applies(self, handler: str) -> bool:
        """Whether calls of `handler` must be admitted by its rate limit."""
        return handler in self._limited

    def stamper(self, handler: str, slot: int | None) -> Callable[[], None] | None:
        """What to run once an admitted call has started: stamp its slot with that time."""
        if slot is None:
            return None

        def stamp() -> None:
            task = asyncio.create_task(self._restamp(handler, slot), name="restamp")
            self._stamping.add(task)
            task.add_done_callback(self._stamping.discard)

        return stamp

    async def _restamp(self, handler: str, slot: int) -> None:
        try:
            async with self._pool.connection() as conn:
                await rate_limits.restamp(conn, handler, slot)
        except (psycopg.OperationalError, OSError) as error:
            # The admission's own stamp stands; only the start-time refinement is lost.
            log.warning("could not stamp the start of a %s call (%s)", handler, error)

    async def run_once(self) -> None:
        """Refresh the limited handlers, once."""
        async with self._pool.connection() as conn:
            self._limited = await rate_limits.limited_handlers().run_async(conn)

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
