"""The handler registry: names to functions, async or plain.

A handler is `fn(ctx, params) -> dict` (or a coroutine function returning one). It may run
more than once for one step (at-least-once): a crash after the handler returned but before
its outcome was recorded runs it again, so handlers with side effects should be idempotent
(`ctx.instance_id` and `ctx.step_id` make a natural key).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orch8.errors import ConfigError
from orch8.handlers.context import StepContext

log = logging.getLogger("orch8.handlers")

HandlerFunction = Callable[[StepContext, dict[str, Any]], Any]


class HandlerError(Exception):
    """Raise from a handler to fail the step with a message; `retryable=False` skips retries."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Handler:
    name: str
    function: HandlerFunction
    is_async: bool


class Registry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        # Unknown names already logged: a sequence naming a missing handler may have
        # thousands of instances, and one warning says all there is to say.
        self._reported_unknown: set[str] = set()

    def register(self, name: str, function: HandlerFunction) -> None:
        """Register `function` under `name`; registering a name twice is a mistake."""
        existing = self._handlers.get(name)
        if existing is not None and existing.function is not function:
            raise ConfigError(f"handler {name!r} is registered twice")
        is_async = inspect.iscoroutinefunction(function)
        self._handlers[name] = Handler(name, function, is_async)

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def modules(self) -> list[str]:
        """The modules the registered handlers come from (the built-ins' included)."""
        return sorted({entry.function.__module__ for entry in self._handlers.values()})

    def unknown(self, name: str) -> str:
        """The error for a step naming a handler this process lacks, saying how to fix it.

        Logged as a warning the first time per name; the message goes on every instance.
        """
        loaded = ", ".join(self.modules()) or "nothing"
        message = (f"unknown handler {name!r} (this node loaded: {loaded}; "
                   "set ORCH8_HANDLERS to the module that defines it)")
        if name not in self._reported_unknown:
            self._reported_unknown.add(name)
            log.warning("%s", message)
        return message


default_registry = Registry()


def handler(
    name: str, registry: Registry | None = None
) -> Callable[[HandlerFunction], HandlerFunction]:
    """Decorator: `@orch8.handler("send_email")` registers the function under that name."""

    def register(function: HandlerFunction) -> HandlerFunction:
        (registry or default_registry).register(name, function)
        return function

    return register


def load_modules(modules: tuple[str, ...] | list[str]) -> None:
    """Import user handler modules by dotted name; their decorators register them.

    A module that fails to import is a configuration error with a one-line message, so
    the node stops at boot instead of failing every step that needs it.
    """
    if modules:
        _importable_from_working_directory()
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            raise ConfigError(f"cannot load handler module {module!r}: {error}") from None


def _importable_from_working_directory() -> None:
    """Look modules up in the working directory first, as celery, gunicorn and uvicorn do.

    A console script's `sys.path` starts with its own `bin/` directory, not the one it was
    started from, so without this `ORCH8_HANDLERS=tasks orch8-supervisor` would not find
    `./tasks.py`, the first thing a newcomer tries.
    """
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
