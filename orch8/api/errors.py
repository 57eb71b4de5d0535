"""The API's error shape and the one place exceptions become HTTP responses.

Every error body is `{"error": <stable code>, "detail": <one human sentence>}`. Codes are
part of the API: scripts may branch on them, so they never change meaning. Nothing a
caller sends may produce a 5xx or a traceback; the catch-all handler exists for our own
bugs and still says nothing about internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
import psycopg
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from orch8.database import redact
from orch8.errors import ConfigError, Conflict, DefinitionError, NotFound

log = logging.getLogger("orch8.api")

# HTTP status -> stable error code.
CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    """A request the API refuses, with its status and a detail safe to show the caller."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None
                  ) -> Response:
    """A JSON response encoded with orjson (datetimes and UUIDs included)."""
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None
                   ) -> Response:
    """The one error body shape."""
    body = {"error": CODES.get(status, "error"), "detail": redact(detail)}
    return json_response(body, status, headers)


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.detail, error.headers)


async def _definition_error(request: Request, error: Exception) -> Response:
    return error_response(422, str(error))


async def _not_found(request: Request, error: Exception) -> Response:
    return error_response(404, str(error))


async def _conflict(request: Request, error: Exception) -> Response:
    return error_response(409, str(error))


async def _http_exception(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    # Starlette's own 404 (no route) and 405 (wrong method) arrive here.
    detail = {404: f"nothing at {request.url.path}",
              405: f"method {request.method} not allowed here"}
    headers = dict(error.headers or {})
    return error_response(error.status_code, detail.get(error.status_code, str(error.detail)),
                          headers)


async def _unexpected(request: Request, error: Exception) -> Response:
    # Our bug, not the caller's: log it (redacted) and answer without internals.
    log.error("unhandled error on %s %s: %s", request.method, request.url.path,
              redact(f"{type(error).__name__}: {error}"))
    return error_response(500, "internal error; see the node's log")


async def _database_unavailable(request: Request, error: Exception) -> Response:
    # The database is the node's only shared state: without it, ask the caller to retry.
    log.warning("database unavailable for %s %s: %s", request.method, request.url.path,
                redact(str(error)))
    return error_response(503, "the database is unreachable; try again shortly",
                          {"Retry-After": "1"})


async def _client_disconnect(request: Request, error: Exception) -> Response:
    # The client went away mid-request: not a server error, and nobody reads the answer.
    log.info("client went away during %s %s", request.method, request.url.path)
    return error_response(400, "the client disconnected")


async def _config_error(request: Request, error: Exception) -> Response:
    return error_response(503, "the node is misconfigured; see its log")


def exception_handlers() -> dict[Any, Any]:
    """Handlers to pass to `Starlette(exception_handlers=...)`."""
    return {
        ApiError: _api_error,
        DefinitionError: _definition_error,
        NotFound: _not_found,
        Conflict: _conflict,
        ConfigError: _config_error,
        psycopg.OperationalError: _database_unavailable,
        PoolTimeout: _database_unavailable,
        HTTPException: _http_exception,
        ClientDisconnect: _client_disconnect,
        Exception: _unexpected,
    }
