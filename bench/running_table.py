"""What marking running steps costs a worker: handler calls and whole drains, interleaved.

    python bench/running_table.py [--calls 200000] [--runs 5]
    python bench/running_table.py --drain [--instances 10000] [--runs 3]

Every handler call a supervised worker makes is marked in its table of running steps
(`supervisor.running`) before the handler starts and cleared after: in the table's lane
for a coroutine that returns without waiting, in a row of its own for a plain function in
a thread. The first form times the builtin `noop` handler (a coroutine) and a plain one
called as a worker calls them (`orch8.engine.calls.Caller`, eagerly on the loop and in a
thread), without a table and with one; `--drain` drains a backlog of one-step `noop`
instances with one real `Worker` process without the table and one with it. Both
alternate bare and tracked in each run (A B A B ...) and report medians with min-max, the
ratio taken within each run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from orch8.config import Settings  # noqa: E402
from orch8.engine.calls import Caller  # noqa: E402
from orch8.engine.stats import WorkerStats  # noqa: E402
from orch8.engine.worker import Worker  # noqa: E402
from orch8.handlers.builtin import noop  # noqa: E402
from orch8.handlers.context import StepContext  # noqa: E402
from orch8.handlers.registry import Handler  # noqa: E402
from orch8.model import Step  # noqa: E402
from orch8.store.claims import Owner  # noqa: E402
from supervisor.running import RunningTable, table_rows  # noqa: E402


def sync_noop(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    return {}


def time_on_the_loop(caller: Caller, context: StepContext, calls: int) -> float:
    """ns per `noop` call started (and finished) on the event loop, as a held claim's."""
    handler, step = Handler("noop", noop, True), Step("step", "noop")

    async def run() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            caller.call_now(handler, step, context)
        caller.count_quick()
        return (time.perf_counter() - started) / calls * 1e9

    return asyncio.run(run())


def time_in_a_thread(caller: Caller, context: StepContext, calls: int) -> float:
    """ns per plain call in the handler thread, its hand-off to the thread included."""
    handler, step = Handler("sync_noop", sync_noop, False), Step("step", "sync_noop")

    async def run() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await caller.call(handler, step, context)
        return (time.perf_counter() - started) / calls * 1e9

    return asyncio.run(run())


def tracked_worker(dsn: str, slot: int, ready: Any, stop: Any, options: dict[str, Any]) -> None:
    """`_common.engine_worker`, with handlers marking a table of running steps as a
    supervised worker's do."""
    settings = Settings(**options)
    table = RunningTable.create(table_rows(settings.max_in_flight))

    async def main() -> None:
        stopping = asyncio.Event()
        worker = Worker(settings, dsn, Owner("bench", uuid.UUID(int=1), slot), tracker=table)
        task = asyncio.create_task(worker.run(stopping))
        ready.release()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        stopping.set()
        await task

    asyncio.run(main())


def drains(instances: int, runs: int) -> None:
    server = _common.server_dsn()
    rates: dict[str, list[float]] = {"bare": [], "tracked": []}
    ratios = []
    for _ in range(runs):
        for name, target in (("bare", _common.engine_worker), ("tracked", tracked_worker)):
            dsn = _common.scratch_database(server)
            try:
                _common.park_backlog(dsn, instances)
                rates[name].append(_common.timed_drain(
                    dsn, target, 1, {"batch_size": 50},
                    lambda dsn=dsn: _common.drained_rate(dsn, instances)))
            finally:
                _common.drop_database(server, dsn)
        ratios.append(rates["tracked"][-1] / rates["bare"][-1])
    result: dict[str, Any] = {"instances": instances, "runs": runs}
    for name, values in rates.items():
        result[name] = {"median_per_s": round(statistics.median(values)),
                        "min_per_s": round(min(values)), "max_per_s": round(max(values))}
        print(f"{name:8} {result[name]['median_per_s']}/s "
              f"(min {result[name]['min_per_s']}, max {result[name]['max_per_s']})")
    result["ratio"] = {"median": round(statistics.median(ratios), 3),
                       "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    print(f"tracked / bare: {result['ratio']['median']} "
          f"(min {result['ratio']['min']}, max {result['ratio']['max']})")
    print(orjson.dumps(result).decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--instances", type=int, default=10_000)
    args = parser.parse_args()
    if args.drain:
        drains(args.instances, args.runs)
        return
    table = RunningTable.create(table_rows(100))
    bare_caller = Caller(WorkerStats(), ThreadPoolExecutor(1))
    tracking_caller = Caller(WorkerStats(), ThreadPoolExecutor(1), tracker=table)
    context = StepContext(uuid.uuid4(), "bench", "step", 1, {}, {})
    added: dict[str, list[float]] = {"async": [], "sync": []}
    bare_ns: dict[str, list[float]] = {"async": [], "sync": []}
    threaded_calls = max(1, args.calls // 20)  # (a hand-off to a thread costs ~20 calls)
    for _ in range(args.runs):
        bare = time_on_the_loop(bare_caller, context, args.calls)
        added["async"].append(time_on_the_loop(tracking_caller, context, args.calls) - bare)
        bare_ns["async"].append(bare)
        bare = time_in_a_thread(bare_caller, context, threaded_calls)
        added["sync"].append(time_in_a_thread(tracking_caller, context, threaded_calls) - bare)
        bare_ns["sync"].append(bare)
    table.close()
    result = {}
    for kind, values in added.items():
        result[kind] = {"bare_ns": round(statistics.median(bare_ns[kind])),
                        "added_ns_median": round(statistics.median(values)),
                        "added_ns_min": round(min(values)), "added_ns_max": round(max(values))}
        print(f"{kind:5} handler: bare {result[kind]['bare_ns']} ns/call; tracking adds "
              f"{result[kind]['added_ns_median']} ns (min {result[kind]['added_ns_min']}, "
              f"max {result[kind]['added_ns_max']}) over {args.runs} interleaved runs")
    print(orjson.dumps({"calls": args.calls, "runs": args.runs, **result}).decode())


if __name__ == "__main__":
    main()
