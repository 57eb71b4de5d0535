"""Run real `Worker`s in this process against the test database until a condition holds."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from orch8.config import Settings
from orch8.engine.worker import Worker
from orch8.store.claims import Owner

FAST = Settings(tick_interval_ms=20, commit_linger_ms=0.0, drain_timeout_s=10)


def run_workers_until(
    dsn: str,
    done: Callable[[], bool],
    *,
    settings: Settings = FAST,
    workers: int = 1,
    timeout_s: float = 20.0,
) -> list[Worker]:
    """Run `workers` workers until `done()` is true (checked from a thread), then stop them."""

    async def main() -> list[Worker]:
        stop = asyncio.Event()
        incarnation = uuid.uuid4()
        team = [Worker(settings, dsn, Owner("test-node", incarnation, slot))
                for slot in range(workers)]
        tasks = [asyncio.create_task(worker.run(stop)) for worker in team]
        deadline = time.monotonic() + timeout_s
        try:
            while not await asyncio.to_thread(done):
                if time.monotonic() > deadline:
                    raise TimeoutError("condition not reached in time")
                if any(task.done() for task in tasks):
                    break
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        return team

    return asyncio.run(main())
