"""Handlers of the fault suite, loaded into real workers with ORCH8_HANDLERS.

Every execution appends a `start` and an `end` line to a ledger kept outside PostgreSQL
(the JSON-lines file named by FAULT_LEDGER, appended with O_APPEND and fsynced), naming the
node, its incarnation, the worker slot and pid, the instance, step, attempt and the claim
epoch it runs under. The suite holds the database's record against it: the ledger says what
ran, the database what was recorded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import orjson
import psycopg
import setproctitle

from orch8 import StepContext, handler

CLAIM = """
SELECT claim_incarnation::text, claimed_slot, claim_epoch FROM instances WHERE id = %(id)s
"""
_connection: psycopg.AsyncConnection[Any] | None = None


def append(event: str, ctx: StepContext, claim: tuple[Any, ...]) -> None:
    """One fsynced line; a single small O_APPEND write is never interleaved with another."""
    incarnation, slot, epoch = claim
    line = orjson.dumps({
        "event": event, "t": time.time(), "node": os.environ.get("ORCH8_NODE_ID"),
        "incarnation": incarnation, "worker": slot, "pid": os.getpid(),
        "title": setproctitle.getproctitle(), "instance": str(ctx.instance_id),
        "step": ctx.step_id, "attempt": ctx.attempt, "epoch": epoch,
    }) + b"\n"
    descriptor = os.open(os.environ["FAULT_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def claim_of(ctx: StepContext) -> tuple[Any, ...]:
    """(incarnation, slot, epoch) the instance is claimed under, read as the step starts."""
    global _connection
    try:
        if _connection is None or _connection.closed:
            _connection = await psycopg.AsyncConnection.connect(
                os.environ["DATABASE_URL"], autocommit=True, connect_timeout=5)
        cursor = await _connection.execute(CLAIM, {"id": ctx.instance_id})
        row = await cursor.fetchone()
    except (psycopg.Error, OSError):  # the database is restarting: the ledger still counts
        _connection = None
        return (None, None, None)
    return tuple(row) if row else (None, None, None)


def claim_now(ctx: StepContext) -> tuple[Any, ...]:
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute(CLAIM, {"id": ctx.instance_id}).fetchone()
    return tuple(row) if row else (None, None, None)


@handler("ledger")
async def ledger(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Record the start, sleep `params.ms`, record the end."""
    claim = await claim_of(ctx)
    append("start", ctx, claim)
    await asyncio.sleep(params.get("ms", 0) / 1000)
    append("end", ctx, claim)
    return {"node": os.environ.get("ORCH8_NODE_ID"), "incarnation": claim[0],
            "pid": os.getpid()}


# How often a blocking handler proves it still runs.
TICK_S = 0.05


@handler("ledger_blocking")
def ledger_blocking(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """A plain (non-async) handler that blocks its thread for `params.ms`, writing a `tick`
    line every 50 ms while it runs: a test reads from the ledger until when it really ran
    (a process that dies takes its handler thread with it, and writes no `end`)."""
    claim = claim_now(ctx)
    append("start", ctx, claim)
    deadline = time.monotonic() + params.get("ms", 0) / 1000
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(TICK_S, left))
        append("tick", ctx, claim)
    append("end", ctx, claim)
    return {"node": os.environ.get("ORCH8_NODE_ID"), "incarnation": claim[0],
            "pid": os.getpid()}


@handler("poison")
async def poison(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Kill the worker running it, every time."""
    append("start", ctx, await claim_of(ctx))
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


@handler("ledger_limited")
async def ledger_limited(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """`ledger` under a name of its own, so that a rate limit can apply to it alone."""
    return await ledger(ctx, params)
