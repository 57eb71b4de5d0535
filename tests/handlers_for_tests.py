"""Handlers the supervisor tests run inside real worker processes.

`record` writes one row per execution (which node, which process) before sleeping, so a
test can prove from data which process ran what, and how many times.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

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


@handler("block_loop")
async def block_loop(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Hang the worker: block its event loop (no reports reach the supervisor)."""
    time.sleep(params.get("s", 30))
    return {}
