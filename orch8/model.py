"""The engine's vocabulary: states, priorities, steps and sequences, validated on the way in.

Rows read back from the store are frozen dataclasses too; they live in the store module
that reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from orch8.errors import DefinitionError


class State(StrEnum):
    """Mirrors the CHECK constraint on `instances.state`."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})


class Priority(IntEnum):
    """Stored as a smallint; higher is claimed first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: Any) -> Priority:
        """Accept a name (`"high"`) or its number; raise `DefinitionError` otherwise."""
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
            return cls(value)
        raise DefinitionError("priority", "must be one of low, normal, high, critical")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STEP_KEYS = {"id", "handler", "params", "retry", "timeout_ms", "delay_ms"}
_RETRY_KEYS = {"max_attempts", "initial_backoff_ms", "max_backoff_ms", "multiplier"}
MAX_STEPS = 1000
MAX_MS = 7 * 24 * 3600 * 1000  # a week: longer waits belong in run_at, not in a step


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 1
    initial_backoff_ms: int = 1000
    max_backoff_ms: int = 60_000
    multiplier: float = 2.0


@dataclass(frozen=True)
class Step:
    id: str
    handler: str
    params: dict[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = RetryPolicy()
    timeout_ms: int | None = None
    delay_ms: int = 0

    def as_json(self) -> dict[str, Any]:
        """The step as stored in `sequences.steps`."""
        body: dict[str, Any] = {"id": self.id, "handler": self.handler, "params": self.params}
        body["retry"] = {
            "max_attempts": self.retry.max_attempts,
            "initial_backoff_ms": self.retry.initial_backoff_ms,
            "max_backoff_ms": self.retry.max_backoff_ms,
            "multiplier": self.retry.multiplier,
        }
        if self.timeout_ms is not None:
            body["timeout_ms"] = self.timeout_ms
        if self.delay_ms:
            body["delay_ms"] = self.delay_ms
        return body


def parse_name(value: Any, field_name: str = "name") -> str:
    """A sequence name: 1-128 letters, digits, '_', '-' or '.', starting alphanumeric."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise DefinitionError(field_name, "must be 1-128 letters, digits, '_', '-' or '.'")
    return value


# The deepest nesting of objects and arrays in any JSON value orch8 stores (an instance's
# input, a step's params). orjson reads 1,024 levels but writes only about 254, so a value
# accepted deeper than that could be stored and never written back out.
MAX_JSON_DEPTH = 64


def check_depth(value: Any, field_name: str) -> None:
    """Refuse a JSON value nested deeper than `MAX_JSON_DEPTH` (`{}` is depth 1)."""
    if isinstance(value, dict) and not any(
            isinstance(child, dict | list) for child in value.values()):
        return  # the common flat object: depth 1, no walk needed
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise DefinitionError(field_name,
                                      f"must be nested at most {MAX_JSON_DEPTH} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def parse_steps(value: Any) -> tuple[Step, ...]:
    """Validate a JSON list of steps; errors name the offending field (`steps[1].retry`)."""
    if not isinstance(value, list) or not value:
        raise DefinitionError("steps", "must be a non-empty list")
    if len(value) > MAX_STEPS:
        raise DefinitionError("steps", f"at most {MAX_STEPS} steps")
    steps = tuple(_parse_step(raw, f"steps[{index}]") for index, raw in enumerate(value))
    seen: set[str] = set()
    for index, step in enumerate(steps):
        if step.id in seen:
            raise DefinitionError(f"steps[{index}].id", f"duplicate step id {step.id!r}")
        seen.add(step.id)
    return steps


def _parse_step(raw: Any, where: str) -> Step:
    if not isinstance(raw, dict):
        raise DefinitionError(where, "must be an object")
    unknown = set(raw) - _STEP_KEYS
    if unknown:
        raise DefinitionError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    step_id = parse_name(raw.get("id"), f"{where}.id")
    handler = raw.get("handler")
    if not isinstance(handler, str) or not _NAME.match(handler):
        raise DefinitionError(f"{where}.handler", "must be a handler name")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise DefinitionError(f"{where}.params", "must be an object")
    check_depth(params, f"{where}.params")
    timeout = raw.get("timeout_ms")
    if timeout is not None:
        timeout = _milliseconds(timeout, f"{where}.timeout_ms", minimum=1)
    delay = _milliseconds(raw.get("delay_ms", 0), f"{where}.delay_ms", minimum=0)
    retry = _parse_retry(raw.get("retry", {}), f"{where}.retry")
    return Step(step_id, handler, params, retry, timeout, delay)


def _parse_retry(raw: Any, where: str) -> RetryPolicy:
    if not isinstance(raw, dict):
        raise DefinitionError(where, "must be an object")
    unknown = set(raw) - _RETRY_KEYS
    if unknown:
        raise DefinitionError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    attempts = raw.get("max_attempts", 1)
    if not _is_int(attempts) or not 1 <= attempts <= 1000:
        raise DefinitionError(f"{where}.max_attempts", "must be an integer from 1 to 1000")
    initial = _milliseconds(raw.get("initial_backoff_ms", 1000), f"{where}.initial_backoff_ms")
    most = _milliseconds(raw.get("max_backoff_ms", max(60_000, initial)), f"{where}.max_backoff_ms")
    if most < initial:
        raise DefinitionError(f"{where}.max_backoff_ms", "must not be below initial_backoff_ms")
    multiplier = raw.get("multiplier", 2.0)
    if not isinstance(multiplier, int | float) or isinstance(multiplier, bool):
        raise DefinitionError(f"{where}.multiplier", "must be a number")
    if not 1.0 <= multiplier <= 10.0:
        raise DefinitionError(f"{where}.multiplier", "must be from 1 to 10")
    return RetryPolicy(attempts, initial, most, float(multiplier))


def _milliseconds(value: Any, where: str, minimum: int = 0) -> int:
    if not _is_int(value) or not minimum <= value <= MAX_MS:
        raise DefinitionError(where, f"must be an integer from {minimum} to {MAX_MS}")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def steps_from_json(value: list[dict[str, Any]]) -> tuple[Step, ...]:
    """Steps as stored (already validated when written)."""
    return parse_steps(value)
