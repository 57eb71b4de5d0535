"""Handlers: the functions a step names. Register with `@orch8.handler("name")`."""

from orch8.handlers.context import StepContext
from orch8.handlers.registry import (
    HandlerError,
    Registry,
    default_registry,
    handler,
    load_modules,
)

__all__ = [
    "HandlerError",
    "Registry",
    "StepContext",
    "default_registry",
    "handler",
    "load_modules",
]

# Importing the package registers the built-ins (noop, log, sleep, fail).
from orch8.handlers import builtin  # noqa: E402,F401
