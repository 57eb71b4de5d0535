"""Handlers used by the engine-core tests; importing this module registers them."""

from __future__ import annotations

import threading
from typing import Any

import orch8
from orch8 import HandlerError, StepContext

# Per-instance attempt counters live in the test process (handlers run in-process here).
_lock = threading.Lock()
calls: dict[str, int] = {}


@orch8.handler("test_flaky")
def flaky(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Fail `params.failures` times for each instance, then succeed."""
    key = str(ctx.instance_id)
    with _lock:
        calls[key] = calls.get(key, 0) + 1
        count = calls[key]
    if count <= params.get("failures", 0):
        raise RuntimeError(f"boom {count}")
    return {"attempt": ctx.attempt, "calls": count}


@orch8.handler("test_context")
async def context(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    return {"input": ctx.input, "steps": ctx.steps, "attempt": ctx.attempt,
            "step_id": ctx.step_id, "sequence": ctx.sequence}


@orch8.handler("test_not_a_dict")
def not_a_dict(ctx: StepContext, params: dict[str, Any]) -> Any:
    return [1, 2, 3]


@orch8.handler("test_fatal")
def fatal(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    raise HandlerError("card declined", retryable=False)


@orch8.handler("test_thread_name")
def thread_name(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    return {"thread": threading.current_thread().name}
