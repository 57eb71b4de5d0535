"""What checking a pooled connection before each use costs the API: one request's checkout
and statement with the pool's own check (an empty query), with `orch8.database.check_pooled`
(the API pool's: a zero-timeout `poll`, the query only when the socket is readable), and
with no check at all, alternating within each repetition; each one's client CPU is also
given as a ratio to the empty query's in the same repetition.

    .venv/bin/python bench/pool_check.py [--requests 3000] [--runs 5]

Each request is `SELECT 1` on a connection taken from a one-connection pool, one after
another, so the figures are the client's CPU and the wall time per request (the round
trip included). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.runs import summarised  # noqa: E402
from bench.server import DATA_DIR, Server  # noqa: E402
from orch8.database import check_pooled  # noqa: E402

Check = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None
CHECKS: dict[str, Check] = {"empty query": AsyncConnectionPool.check_connection,
                            "check_pooled": check_pooled, "no check": None}
WARM_UP = 200


async def requests(dsn: str, check: Check, count: int) -> dict[str, float]:
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False,
                               kwargs={"autocommit": True}, check=check)
    await pool.open(wait=True, timeout=30)
    try:
        for _ in range(WARM_UP):  # past psycopg's prepare threshold, caches warm
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(count):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await pool.close()
    return {"cpu_us": cpu * 1e6 / count, "wall_us": wall * 1e6 / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    server = Server.open(DATA_DIR)
    found: dict[str, list[dict[str, float]]] = {}
    try:
        for run in range(args.runs):
            first: dict[str, float] = {}
            for name, check in CHECKS.items():  # the pool's own check first: the ratios'
                figures = asyncio.run(requests(server.dsn, check, args.requests))
                first = first or figures
                figures["cpu_vs_empty_query"] = figures["cpu_us"] / first["cpu_us"]
                found.setdefault(name, []).append(figures)
                print(f"run {run + 1}: {name}: client CPU {figures['cpu_us']:.1f} µs "
                      f"({figures['cpu_vs_empty_query']:.2f}× the empty query's), "
                      f"wall {figures['wall_us']:.1f} µs per request", flush=True)
    finally:
        server.close()
    print(orjson.dumps(summarised(found)).decode())


if __name__ == "__main__":
    main()
