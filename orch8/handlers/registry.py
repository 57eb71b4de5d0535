"""The handler registry: names to functions, async or plain.

A handler is `fn(ctx, params) -> dict` (or a coroutine function returning one). It may run
more than once for one step (at-least-once): a crash after the handler returned but before
its outcome was recorded runs it again, so handlers with side effects should be idempotent
(`ctx.instance_id` and `ctx.step_id` make a natural key).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orch8.errors import ConfigError
from orch8.handlers.context import StepContext

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

    def register(self, name: str, function: HandlerFunction) -> None:
        """Register `function` under `name`; registering a name twice is a mistake."""
        existing = self._handlers.get(name)
        if existing is not None and existing.function is not function:
            raise ConfigError(f"handler {name!r} is registered twice")
        is_async = inspect.iscoroutinefunction(function)
        self._handlers[name] = Handler(name, function, is_async)

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)


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
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            raise ConfigError(f"cannot load handler module {module!r}: {error}") from None


