"""Reading what a request carries: a bounded JSON body and query parameters.

Each reader raises `ApiError` with the status that names the caller's mistake, before any
query runs, so a refused request never writes anything.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from starlette.requests import Request

from orch8.api.errors import ApiError

# A single request: an instance input may be up to 1 MB (orch8.requests), plus envelope.
MAX_BODY_BYTES = 2 * 1024 * 1024
# A batch of up to MAX_BATCH instances.
MAX_BATCH_BODY_BYTES = 16 * 1024 * 1024


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON body: 415 if not JSON, 413 if too big, 400 if malformed."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "send the body as JSON with Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not _is_count(declared) or int(declared) > max_bytes):
        raise ApiError(413, f"the body must be at most {max_bytes} bytes")
    body = bytearray()
    # Chunked bodies carry no length: count while reading and stop at the limit.
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"the body must be at most {max_bytes} bytes")
    try:
        value = orjson.loads(bytes(body))
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"malformed JSON: {error}") from None
    _reject_nul(value)
    return value


def _reject_nul(value: Any) -> None:
    """PostgreSQL's jsonb cannot hold U+0000; refuse it here rather than fail in the store."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ApiError(422, "strings must not contain U+0000")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def object_body(value: Any, allowed: set[str]) -> dict[str, Any]:
    """`value` as a JSON object with no field outside `allowed` (422 otherwise)."""
    if not isinstance(value, dict):
        raise ApiError(422, "body: must be a JSON object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ApiError(422, f"{unknown[0]}: unknown field")
    return value


def reject_nulls(value: Any, where: str = "") -> None:
    """Refuse `null` for a field: an optional field is left out, never sent empty.

    Checks an object's own fields (not its free-form `input` or `params` contents).
    """
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if item is None:
            raise ApiError(422, f"{where}{key}: must not be null (leave it out instead)")


def query_uuid(request: Request, name: str) -> uuid.UUID | None:
    """An optional UUID query parameter."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, f"{name}: must be a UUID") from None


def query_int(request: Request, name: str, default: int | None, low: int, high: int
              ) -> int | None:
    """An optional integer query parameter within [low, high]."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not _is_count(raw) or not low <= int(raw) <= high:
        raise ApiError(400, f"{name}: must be an integer from {low} to {high}")
    return int(raw)


def check_query(request: Request, allowed: set[str]) -> None:
    """Refuse unknown or empty query parameters: a typo must not silently widen a listing."""
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown query parameter")
    for name, value in request.query_params.multi_items():
        if value == "":
            raise ApiError(400, f"{name}: must not be empty")
        if "\x00" in value:  # PostgreSQL text cannot hold it: refuse rather than fail
            raise ApiError(400, f"{name}: must not contain U+0000")


def _is_count(raw: str) -> bool:
    """ASCII digits only, and few enough that `int()` is cheap and cannot refuse them."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 18
