"""What the claim's registration check costs: claims by a registered node vs by a node id
with no row (which the check skips), interleaved.

    python bench/claim_registration.py [--claims 200] [--batch 50] [--runs 5]

The claim reads its node's `cluster_nodes` row FOR KEY SHARE so that an incarnation that
has been replaced claims nothing (orch8.store.claims.CLAIMER_REPLACED). This times claim
statements of `--batch` instances each, alternating a registered owner and an unregistered
one (A B A B ...) on one backlog big enough that no instance is claimed twice, and
reports microseconds per claim statement: medians with min-max over the runs, and the
registered/unregistered ratio taken within each run.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from orch8.store import claims, nodes  # noqa: E402
from orch8.store.claims import Owner  # noqa: E402


async def claim_time(dsn: str, owner: Owner, count: int, batch: int) -> float:
    """Microseconds per claim statement, over `count` claims."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        spent = 0.0
        for _ in range(count):
            started = time.perf_counter()
            taken = await claims.claim(conn, owner, batch)
            spent += time.perf_counter() - started
            assert len(taken) == batch, "the backlog ran dry"
    return spent / count * 1e6


async def run(dsn: str, claims_per_run: int, batch: int, runs: int) -> dict[str, object]:
    registered = Owner("bench-registered", uuid.uuid4(), 1)
    unregistered = Owner("bench-unregistered", uuid.uuid4(), 1)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await nodes.register(conn, registered.node_id, registered.incarnation, "bench", 1, 1,
                             60.0)
    times: dict[str, list[float]] = {"registered": [], "unregistered": []}
    ratios = []
    for _ in range(runs):
        for name, owner in (("registered", registered), ("unregistered", unregistered)):
            times[name].append(await claim_time(dsn, owner, claims_per_run, batch))
        ratios.append(times["registered"][-1] / times["unregistered"][-1])
    result: dict[str, object] = {"claims": claims_per_run, "batch": batch, "runs": runs}
    for name, values in times.items():
        result[name] = {"median_us": round(statistics.median(values)),
                        "min_us": round(min(values)), "max_us": round(max(values))}
        print(f"{name:12} {statistics.median(values):7.0f} us per claim "
              f"(min {min(values):.0f}, max {max(values):.0f})")
    result["ratio"] = {"median": round(statistics.median(ratios), 3),
                       "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    print(f"registered / unregistered: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    server = _common.server_dsn()
    dsn = _common.scratch_database(server)
    try:
        _common.park_backlog(dsn, 2 * args.runs * args.claims * args.batch)
        _common.release_backlog(dsn)
        result = asyncio.run(run(dsn, args.claims, args.batch, args.runs))
    finally:
        _common.drop_database(server, dsn)
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
