"""Built-in handlers: `noop`, `log`, `sleep`, `fail`."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from orch8.handlers.context import StepContext
from orch8.handlers.registry import HandlerError, handler

log = logging.getLogger("orch8.handlers")

_PLACEHOLDER = re.compile(r"\{\{\s*(input|steps)((?:\.[A-Za-z0-9_-]+)+)\s*\}\}")


@handler("noop")
async def noop(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Does nothing; returns its params so tests and demos can see data flow."""
    return dict(params)


@handler("log")
async def log_message(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Log `params.message` with `{{ input.x }}` and `{{ steps.<id>.<key> }}` filled in."""
    message = render(str(params.get("message", "")), ctx)
    log.info("[%s] %s", ctx.instance_id, message)
    return {"message": message}


@handler("sleep")
async def sleep(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Sleep `params.ms` milliseconds in process (cancellable; not a durable delay)."""
    milliseconds = params.get("ms", 0)
    if not isinstance(milliseconds, int | float) or milliseconds < 0:
        raise HandlerError("sleep: params.ms must be a non-negative number", retryable=False)
    await asyncio.sleep(milliseconds / 1000)
    return {"slept_ms": milliseconds}


@handler("fail")
def fail(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Always fail with `params.message`; `params.retryable` (default true) allows retries."""
    retryable = params.get("retryable", True)
    raise HandlerError(str(params.get("message", "failed on purpose")), retryable=bool(retryable))


def render(template: str, ctx: StepContext) -> str:
    """Substitute placeholders by walking dictionaries: lookups only, never evaluation."""

    def replace(match: re.Match[str]) -> str:
        root: Any = ctx.input if match.group(1) == "input" else ctx.steps
        for key in match.group(2).strip(".").split("."):
            if not isinstance(root, dict) or key not in root:
                return ""
            root = root[key]
        return root if isinstance(root, str) else _plain(root)

    return _PLACEHOLDER.sub(replace, template)


def _plain(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()
