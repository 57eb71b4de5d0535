"""Drain a backlog of one-step `noop` instances; compare the engine with a raw SQL loop.

    python bench/throughput.py [--instances 10000] [--runs 3] [--batch 50]

For 1 and 2 worker processes it reports the engine's rate (instances/s, median of runs)
and, in the same run, the rate of a bare loop of the same SQL shape (claim a batch, insert
its outputs, mark it completed) with no engine around it. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import uuid
from pathlib import Path

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from orch8.config import Settings  # noqa: E402
from orch8.store import claims  # noqa: E402
from orch8.store.claims import Owner  # noqa: E402

RAW_FINISH = """
WITH done AS (
    UPDATE instances SET state = 'completed', finished_at = now(), step_index = 1
    WHERE id = ANY(%(ids)s) RETURNING id
)
INSERT INTO step_outputs (instance_id, step_id, output, attempt)
SELECT id, 'only', '{}'::jsonb, 1 FROM done
"""


ENGINE_OPTIONS: dict[str, float] = {}


def raw_process(dsn: str, slot: int, ready, stop, options) -> None:  # type: ignore[no-untyped-def]
    batch = options["batch_size"]

    async def main() -> None:
        owner = Owner("raw", uuid.UUID(int=2), slot)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            ready.release()
            while not stop.is_set():
                claimed = await claims.claim(conn, owner, batch)
                if not claimed:
                    await asyncio.sleep(0.01)
                    continue
                async with conn.transaction():
                    await conn.execute(RAW_FINISH, {"ids": [c.id for c in claimed]})

    asyncio.run(main())


def one_run(server: str, target, processes: int, count: int, batch: int) -> float:  # type: ignore[no-untyped-def]
    dsn = _common.scratch_database(server)
    try:
        _common.park_backlog(dsn, count)
        options = {"batch_size": batch, "tick_interval_ms": 100, "max_in_flight": 2 * batch,
                   **ENGINE_OPTIONS}
        return _common.timed_drain(dsn, target, processes, options,
                                   lambda: _common.drained_rate(dsn, count))
    finally:
        _common.drop_database(server, dsn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--linger-ms", type=float, default=Settings.commit_linger_ms,
                        help="group commit: wait this long to gather outcomes")
    parser.add_argument("--commit-max-batch", type=int, default=Settings.commit_max_batch,
                        help="group commit: most outcomes per statement (1 = off)")
    args = parser.parse_args()
    ENGINE_OPTIONS.update(commit_linger_ms=args.linger_ms, commit_max_batch=args.commit_max_batch)
    server = _common.server_dsn()
    result: dict[str, float | int] = {"instances": args.instances, "batch": args.batch,
                                      "runs": args.runs, "linger_ms": args.linger_ms,
                                      "commit_max_batch": args.commit_max_batch}
    for processes in (1, 2):
        for name, target in (("engine", _common.engine_worker), ("raw", raw_process)):
            rates = [one_run(server, target, processes, args.instances, args.batch)
                     for _ in range(args.runs)]
            median = statistics.median(rates)
            result[f"{name}_{processes}w_per_s"] = round(median, 1)
            print(f"{name:6} {processes} process(es): median {median:8.1f}/s "
                  f"(runs: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    result["engine_per_s"] = result["engine_2w_per_s"]
    result["raw_per_s"] = result["raw_2w_per_s"]
    result["ratio"] = round(float(result["engine_per_s"]) / float(result["raw_per_s"]), 3)
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
