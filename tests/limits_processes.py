"""Worker processes for the multi-process limit tests, and the handlers they run.

Each process runs one real `Worker` (its own owner: node id, incarnation, slot) against
the test database, exactly as a supervisor's worker would, until the parent sets `stop`.
The handlers record what they did in the `observed_calls` table (Python's clock: every
process runs on this machine), so the parent reads real start and end times.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

import orch8
from orch8 import StepContext
from orch8.config import Settings
from orch8.engine.worker import Worker
from orch8.store.claims import Owner
from tests.engine_helpers import wait_for_listeners

OBSERVED = """
CREATE TABLE IF NOT EXISTS observed_calls (
    instance_id uuid             NOT NULL,
    label       text             NOT NULL,
    node_id     text             NOT NULL,
    started     double precision NOT NULL,
    ended       double precision NOT NULL
)
"""

# One recording connection per process (opened by `run_worker`), shared by the handler
# threads under a lock: a connection per thread would add its connect time to the steps.
_lock = threading.Lock()
_recorder: psycopg.Connection[Any] | None = None
_node_id = ""


def _record(ctx: StepContext, started: float, ended: float) -> None:
    assert _recorder is not None, "handlers record only inside run_worker"
    with _lock:
        _recorder.execute(
            "INSERT INTO observed_calls VALUES (%s, %s, %s, %s, %s)",
            (ctx.instance_id, ctx.input.get("label", ""), _node_id, started, ended))


@orch8.handler("test_timed_step")
def timed_step(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Take `params.sleep_ms`, recording when the call started and ended."""
    started = time.time()
    time.sleep(params.get("sleep_ms", 0) / 1000)
    _record(ctx, started, time.time())
    return {}


def run_worker(dsn: str, node_id: str, slot: int, settings: Settings,
               ready: Any, stop: Any) -> None:
    """A worker process's whole life: say `ready` once started, run until `stop`."""
    global _recorder, _node_id
    _recorder, _node_id = psycopg.connect(dsn, autocommit=True), node_id

    async def main() -> None:
        stopping = asyncio.Event()
        worker = Worker(settings, dsn, Owner(node_id, uuid.uuid4(), slot))
        running = asyncio.create_task(worker.run(stopping))
        ready.release()
        while not stop.is_set() and not running.done():
            await asyncio.sleep(0.05)
        stopping.set()
        await running

    asyncio.run(main())


@contextmanager
def worker_processes(dsn: str, nodes: list[str], settings: Settings) -> Iterator[None]:
    """Run one worker process per entry of `nodes` (a node id each) while inside.

    Work created inside the block finds every worker already up and idle.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(OBSERVED)
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Semaphore(0), context.Event()
    processes = [context.Process(target=run_worker,
                                 args=(dsn, node, slot, settings, ready, stop),
                                 name=f"worker-{node}-{slot}")
                 for slot, node in enumerate(nodes)]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            if not ready.acquire(timeout=60):
                raise TimeoutError("a worker process did not start")
        # Up and idle: each has its pool open and its claim loop running (it LISTENs).
        wait_for_listeners(dsn, len(processes))
        yield
    finally:
        stop.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()


def wait_until_finished(dsn: str, count: int, timeout_s: float) -> None:
    """Poll until `count` instances are completed; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            done = conn.execute(
                "SELECT count(*) FROM instances WHERE state = 'completed'").fetchone()[0]
            if done >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {done} of {count} instances completed")
            time.sleep(0.1)
