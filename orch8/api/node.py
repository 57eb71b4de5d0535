"""What the HTTP app may know of the node serving it.

The supervisor implements `NodeView`; the app reads it and never imports the supervisor,
so `orch8/` stays free of process management.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from psycopg_pool import AsyncConnectionPool

from orch8.config import Settings
from orch8.engine.stats import Folded
from orch8.store.query import Query

T = TypeVar("T")
# The longest a request waits for one of the API pool's connections before its 503. The
# admission gate bounds how many wait; this bounds how long (a database that does not
# answer holds them all).
CONNECTION_WAIT_S = 5.0


@dataclass(frozen=True)
class WorkerReport:
    """A worker's latest report, as received over its pipe."""

    slot: int
    pid: int
    alive: bool
    # Totals since this worker process started (they restart from 0 with a new process).
    counts: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    # Observed since the worker's previous report (for histograms), folded into buckets.
    step_seconds: Folded = Folded()
    claim_lateness_seconds: Folded = Folded()


ReportListener = Callable[[WorkerReport], None]


class NodeView(Protocol):
    node_id: str
    settings: Settings
    # An async pool on the node's database for API queries (not the heartbeat's connection).
    pool: AsyncConnectionPool
    # Where every process of the node writes its counts (`orch8.engine.stats`).
    metrics_dir: str

    def state(self) -> str:
        """"active", "draining" or "stopping"."""
        ...

    def is_ready(self) -> bool:
        """The node's health as its heartbeat sees it (active, database reachable, at least
        one worker up): what /health/ready reports."""
        ...

    def unready_reason(self) -> str:
        """Why the node is not ready ("draining", "no worker is up", ...): the 503 body."""
        ...

    def reports(self) -> list[WorkerReport]:
        """The latest report of every worker slot."""
        ...

    def add_report_listener(self, listener: ReportListener) -> None:
        """Call `listener` (on the supervisor's event loop) with every report that arrives."""
        ...


async def run_query(node: NodeView, query: Query[T]) -> T:
    """Run one store query on a connection from the node's API pool."""
    async with node.pool.connection(timeout=CONNECTION_WAIT_S) as conn:
        return await query.run_async(conn)
