"""Handlers the supervisor tests run inside real worker processes.

`record` writes one row per execution (which node, which process) before sleeping, so a
test can prove from data which process ran what, and how many times. `poison` ends its
own process, after writing its execution to a ledger file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import orjson
import psycopg

from orch8 import StepContext, handler

EXECUTIONS_TABLE = """
CREATE TABLE test_executions (
    instance_id uuid        NOT NULL,
    step_id     text        NOT NULL,
    attempt     integer     NOT NULL,
    node_id     text        NOT NULL,
    pid         integer     NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

RECORD = """
INSERT INTO test_executions (instance_id, step_id, attempt, node_id, pid)
VALUES (%(instance_id)s, %(step_id)s, %(attempt)s, %(node_id)s, %(pid)s)
"""


@handler("record")
async def record(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Record this execution, then sleep `params.ms` milliseconds."""
    node_id = os.environ.get("ORCH8_NODE_ID", "?")
    row = {"instance_id": ctx.instance_id, "step_id": ctx.step_id, "attempt": ctx.attempt,
           "node_id": node_id, "pid": os.getpid()}
    async with await psycopg.AsyncConnection.connect(os.environ["DATABASE_URL"],
                                                     autocommit=True) as conn:
        await conn.execute(RECORD, row)
    await asyncio.sleep(params.get("ms", 0) / 1000)
    return {"node": node_id, "pid": os.getpid()}


def append_to_ledger(path: str, entry: dict[str, Any]) -> None:
    """One JSON line per event, on disk (fsync) before anything else happens."""
    with open(path, "a", encoding="utf-8") as ledger:
        ledger.write(orjson.dumps(entry).decode() + "\n")
        ledger.flush()
        os.fsync(ledger.fileno())


@handler("poison")
def poison(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Record the execution in `params.ledger` (a file, not the database), then end this
    worker process: `params.mode` "exit" calls os._exit(1), "sigkill" SIGKILLs itself."""
    append_to_ledger(params["ledger"], {
        "instance": str(ctx.instance_id), "step": ctx.step_id, "attempt": ctx.attempt,
        "node": os.environ.get("ORCH8_NODE_ID", "?"), "pid": os.getpid()})
    if params["mode"] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


@handler("poison_at_once")
async def poison_at_once(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """`poison` in a coroutine that never suspends: it ends its process while its step
    runs inside a held claim (its row still scheduled, and locked)."""
    return poison(ctx, params)


@handler("ticker")
def ticker(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """A plain handler that runs `params.ms` milliseconds (`params.ms_on[node]` on that
    node), writing a line to `params.ledger` when it starts, every 50 ms while it runs, and
    when it ends: a test reads from the file whether it was still running at some moment."""
    node = os.environ.get("ORCH8_NODE_ID", "?")
    entry = {"instance": str(ctx.instance_id), "node": node, "pid": os.getpid()}
    append_to_ledger(params["ledger"], {**entry, "event": "start", "t": time.time()})
    deadline = time.monotonic() + params.get("ms_on", {}).get(node, params["ms"]) / 1000
    while time.monotonic() < deadline:
        time.sleep(0.05)
        append_to_ledger(params["ledger"], {**entry, "event": "tick", "t": time.time()})
    append_to_ledger(params["ledger"], {**entry, "event": "end", "t": time.time()})
    return {"node": entry["node"]}
@handler("block_loop")
async def block_loop(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Hang the worker: block its event loop (no reports reach the supervisor)."""
    time.sleep(params.get("s", 30))
    return {}


@handler("environment")
async def environment(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """The environment variables named in `params.names`, as this worker sees them."""
    return {name: os.environ.get(name) for name in params["names"]}
