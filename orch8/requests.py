"""Validation of what callers send: the one place an instance request is checked.

The HTTP API and the Python client both build a `NewInstance` through `parse_new_instance`,
so a bad field gets the same message (naming the field) whichever way it arrived.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from orch8.errors import DefinitionError
from orch8.model import MAX_MS, Priority, check_depth, parse_name
from orch8.store.instances import NewInstance

INSTANCE_FIELDS = {
    "sequence", "input", "version", "priority", "delay_ms", "run_at",
    "idempotency_key", "concurrency_key", "max_concurrency",
}
PLAIN_FIELDS = frozenset({"sequence", "input", "delay_ms"})
MAX_KEY_CHARS = 256
MAX_INPUT_BYTES = 1_000_000
# Each slot of a key is a row the claim may lock; a key wider than this is better left
# unkeyed (the worker's in-flight limit already bounds it).
MAX_CONCURRENCY = 1_000


def parse_new_instance(body: Any) -> NewInstance:
    """Check an instance request (a JSON object); raise `DefinitionError` naming the field."""
    if not isinstance(body, dict):
        raise DefinitionError("body", "must be a JSON object")
    # Most requests in a batch carry only a sequence, an input and a delay: for them the
    # unknown-field search and the optional fields' checks would each find nothing.
    plain = body.keys() <= PLAIN_FIELDS
    if not plain:
        unknown = body.keys() - INSTANCE_FIELDS
        if unknown:
            raise DefinitionError(sorted(unknown)[0], "unknown field")
    sequence = parse_name(body.get("sequence"), "sequence")
    data = _input(body.get("input"))
    if plain:
        return NewInstance(sequence, data, Priority.NORMAL,
                           _optional_int(body, "delay_ms", 0, MAX_MS) or 0)
    if "delay_ms" in body and "run_at" in body:
        raise DefinitionError("run_at", "give delay_ms or run_at, not both")
    key = _optional_key(body, "concurrency_key")
    limit = _optional_int(body, "max_concurrency", 1, MAX_CONCURRENCY)
    if (key is None) != (limit is None):
        raise DefinitionError("max_concurrency", "concurrency_key and max_concurrency go together")
    return NewInstance(
        sequence=sequence,
        input=data,
        version=_optional_int(body, "version", 1, 2**31 - 1),
        priority=Priority.parse(body.get("priority", "normal")),
        delay_ms=_optional_int(body, "delay_ms", 0, MAX_MS) or 0,
        run_at=_optional_time(body, "run_at"),
        idempotency_key=_optional_key(body, "idempotency_key"),
        concurrency_key=key,
        max_concurrency=limit,
    )


def _input(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DefinitionError("input", "must be a JSON object")
    if data:  # (an empty object is neither deep nor large)
        check_depth(data, "input")  # before encoding it: orjson refuses deep values with an error
        if len(orjson.dumps(data)) > MAX_INPUT_BYTES:
            raise DefinitionError("input", f"must encode to at most {MAX_INPUT_BYTES} bytes")
    return data


def _optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DefinitionError(name, f"must be an integer from {low} to {high}")
    return value


def _optional_key(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_CHARS:
        raise DefinitionError(name, f"must be a string of 1-{MAX_KEY_CHARS} characters")
    return value


def _optional_time(body: dict[str, Any], name: str) -> datetime | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise DefinitionError(name, "must be an ISO 8601 timestamp") from None
    else:
        raise DefinitionError(name, "must be an ISO 8601 timestamp")
    if moment.tzinfo is None:
        raise DefinitionError(name, "must include a time zone (e.g. Z or +00:00)")
    try:
        # Returned in UTC: ISO 8601 allows offsets PostgreSQL's input refuses (beyond
        # 15:59), and the batch insert sends the moment as text. Converting also refuses a
        # moment past year 9999 (or before year 1) in UTC, which PostgreSQL would store but
        # no Python reader could load back.
        return moment.astimezone(UTC)
    except OverflowError:
        raise DefinitionError(name, "must fall within years 1 to 9999 in UTC") from None
