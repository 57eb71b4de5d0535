"""The cost of concurrency keys: unkeyed throughput with and without a saturated key.

    python bench/concurrency_keys.py [--instances 10000] [--hot 2000] [--runs 3]
                                     [--hot-cap 2] [--hot-step-ms 50]

Each run drains a backlog of one-step `noop` instances (no key) with 2 worker processes
and reports their rate (instances/s, from the first claim to the last completion, by the
database clock). The "saturated" runs add, at critical priority so that they sit at the
head of the claim index, `--hot` instances of one key (max_concurrency `--hot-cap`) whose
step sleeps `--hot-step-ms`: the key stays full for the whole run and its waiters are
parked. The
median of the runs is reported for both; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

BATCH = 50

HOT_SEQUENCE = """
INSERT INTO sequences (name, version, steps) VALUES ('hot', 1, jsonb_build_array(
    jsonb_build_object('id', 'only', 'handler', 'sleep',
                       'params', jsonb_build_object('ms', %(step_ms)s::int))))
"""

# Due at the same moment as the unkeyed backlog (released together), but at critical
# priority: every claim meets the hot key first.
HOT_BACKLOG = """
INSERT INTO instances (id, sequence_name, sequence_version, priority, next_fire_at,
                       concurrency_key, max_concurrency)
SELECT gen_random_uuid(), 'hot', 1, 3, 'infinity', 'hot', %(cap)s
FROM generate_series(1, %(count)s)
"""

UNKEYED_RATE = """
SELECT count(*), extract(epoch FROM max(finished_at) - min(claimed_at))
FROM instances WHERE concurrency_key IS NULL AND state = 'completed'
"""


def unkeyed_rate(dsn: str, count: int) -> float | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(UNKEYED_RATE).fetchone()
    done, seconds = row if row else (0, None)
    if done < count or not seconds:
        return None
    return count / float(seconds)


def one_run(server: str, count: int, hot: int, cap: int, step_ms: int) -> float:
    dsn = _common.scratch_database(server)
    try:
        _common.park_backlog(dsn, count)
        if hot:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(HOT_SEQUENCE, {"step_ms": step_ms})
                conn.execute(HOT_BACKLOG, {"cap": cap, "count": hot})
                conn.execute("ANALYZE instances")
        options = {"batch_size": BATCH, "tick_interval_ms": 100, "max_in_flight": 2 * BATCH}
        return _common.timed_drain(dsn, _common.engine_worker, 2, options,
                                   lambda: unkeyed_rate(dsn, count))
    finally:
        _common.drop_database(server, dsn)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--hot", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hot-cap", type=int, default=2)
    parser.add_argument("--hot-step-ms", type=int, default=50)
    args = parser.parse_args()
    server = _common.server_dsn()
    result: dict[str, float | int] = {"instances": args.instances, "hot": args.hot,
                                      "hot_max_concurrency": args.hot_cap,
                                      "hot_step_ms": args.hot_step_ms, "runs": args.runs}
    # Alternate the two cases so that a change in machine load hits both alike.
    rates: dict[str, list[float]] = {"plain": [], "saturated": []}
    for _ in range(args.runs):
        for name, hot in (("plain", 0), ("saturated", args.hot)):
            rates[name].append(
                one_run(server, args.instances, hot, args.hot_cap, args.hot_step_ms))
    for name, found in rates.items():
        median = statistics.median(found)
        result[f"unkeyed_{name}_per_s"] = round(median, 1)
        print(f"unkeyed work, {name:9}: median {median:8.1f}/s "
              f"(runs: {', '.join(f'{r:.0f}' for r in found)})", flush=True)
    cost = 1 - float(result["unkeyed_saturated_per_s"]) / float(result["unkeyed_plain_per_s"])
    result["cost"] = round(cost, 3)
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
