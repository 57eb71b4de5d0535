"""Completed and failed instances per second, cluster-wide, over the last minutes.

Each node stores its workers' counters in `cluster_nodes.stats` at every heartbeat. A
sampler reads them every few seconds and keeps the increase since its previous reading;
counters that went down (a worker restarted and counts from zero) count from zero. The
chart therefore has the heartbeat's resolution, and the history starts when this node did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from orch8.store import nodes

log = logging.getLogger("orch8.ui")

SAMPLE_EVERY_S = 5.0
KEEP_S = 600.0


@dataclass(frozen=True)
class Point:
    at: float  # time.monotonic()
    completed_per_s: float
    failed_per_s: float


class Throughput:
    """The sampled history; `run(stop)` feeds it, `points()` reads it."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int, int]] = {}
        self._points: deque[Point] = deque()

    def add(self, totals: list[nodes.NodeTotals], now: float | None = None) -> None:
        """Record one reading of every node's counters."""
        now = time.monotonic() if now is None else now
        completed = failed = 0
        elapsed = None
        for row in totals:
            key = f"{row.id}/{row.incarnation}"
            previous = self._last.get(key)
            self._last[key] = (now, row.completed, row.failed)
            if previous is None:
                continue
            elapsed = max(elapsed or 0.0, now - previous[0])
            completed += _increase(previous[1], row.completed)
            failed += _increase(previous[2], row.failed)
        if elapsed:
            self._points.append(Point(now, completed / elapsed, failed / elapsed))
        while self._points and now - self._points[0].at > KEEP_S:
            self._points.popleft()

    def points(self) -> list[Point]:
        return list(self._points)

    async def run(self, pool: AsyncConnectionPool, stop: asyncio.Event) -> None:
        """Sample until `stop` is set; a database outage only leaves a gap."""
        while not stop.is_set():
            with contextlib.suppress(psycopg.OperationalError, PoolTimeout, OSError):
                async with pool.connection(timeout=SAMPLE_EVERY_S) as conn:
                    self.add(await nodes.node_totals().run_async(conn))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


def _increase(before: int, after: int) -> int:
    return after - before if after >= before else after
