"""The three systems as cases of a scenario, each drain on a database of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import engine, own_sql, peer, raw
from bench.engine import NodeSettings
from bench.runs import Case, Figure
from bench.server import Server
from orch8.config import Settings

DEFAULTS = Settings()


@dataclass(frozen=True)
class Context:
    """What every scenario is given: the server, the size of the run, its repetitions."""

    server: Server
    quick: bool
    reps: int
    scale: float = 1.0  # --size: a share of the default sizes, for a slow machine

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else max(quick, round(full * self.scale))


def node_label(settings: NodeSettings) -> str:
    batch = settings.batch_size or DEFAULTS.batch_size
    tick = settings.tick_interval_ms or DEFAULTS.tick_interval_ms
    return f"orch8 batch {batch}, tick {tick} ms, {settings.workers} workers"


def node_settings(settings: NodeSettings) -> dict[str, Any]:
    """The settings a node really runs with (orch8's defaults filled in)."""
    return {"system": "orch8", "workers": settings.workers,
            "batch_size": settings.batch_size or DEFAULTS.batch_size,
            "tick_interval_ms": settings.tick_interval_ms or DEFAULTS.tick_interval_ms,
            "max_in_flight": settings.max_in_flight or DEFAULTS.max_in_flight}


def orch8_case(context: Context, settings: NodeSettings, count: int,
               label: str | None = None, nodes: int = 1) -> Case:
    def measure() -> Figure:
        with context.server.database() as dsn:
            return engine.drain(dsn, settings, count, nodes=nodes)

    return Case(label or node_label(settings), measure,
                {**node_settings(settings), "nodes": nodes})


def raw_case(context: Context, batch: int, processes: int, count: int) -> Case:
    return _plain_case(context, f"raw loop batch {batch}, {processes} processes", "raw",
                       raw.drain, batch, processes, count)


def own_sql_case(context: Context, batch: int, processes: int, count: int) -> Case:
    """orch8's claim and finish statements alone (`bench.own_sql`), on a migrated database."""

    def measure() -> Figure:
        with context.server.database() as dsn:
            return own_sql.drain(dsn, batch, processes, count)

    return Case(f"orch8 SQL alone batch {batch}, {processes} processes", measure,
                {"system": "orch8 SQL alone", "batch_size": batch, "workers": processes})


def pgqueuer_case(context: Context, batch: int, consumers: int, count: int) -> Case:
    return _plain_case(context, f"pgqueuer batch {batch}, {consumers} consumers", "pgqueuer",
                       peer.drain, batch, consumers, count)


def _plain_case(context: Context, label: str, system: str,
                drain: Callable[[str, int, int, int], Figure],
                batch: int, processes: int, count: int) -> Case:
    """A loop that is not orch8, on a fresh empty database at every measurement."""

    def measure() -> Figure:
        with context.server.database(migrated=False) as dsn:
            return drain(dsn, batch, processes, count)

    return Case(label, measure, {"system": system, "batch_size": batch, "workers": processes})
