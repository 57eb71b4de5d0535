"""Per-handler rate limits over HTTP: `PUT/DELETE /rate-limits/{handler}`, `GET /rate-limits`.

A limit is "at most `max` calls of this handler in any `window_ms`", across the cluster
(`orch8.store.rate_limits` keeps and enforces it). The body names the count `max`, as
operators say it; the store calls it `max_calls`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from orch8.api import inputs
from orch8.api.errors import json_response
from orch8.api.node import NodeView, run_query
from orch8.api.routing import by_method
from orch8.errors import DefinitionError
from orch8.model import parse_name
from orch8.store import rate_limits
from orch8.store.rate_limits import RateLimit

LIMIT_FIELDS = {"max", "window_ms"}


def shown(limit: RateLimit) -> dict[str, Any]:
    body = limit.as_json()
    return {"handler": body.pop("handler"), "max": body.pop("max_calls"), **body}


class RateLimits:
    """The rate-limit endpoints of one node."""

    def __init__(self, node: NodeView) -> None:
        self.node = node

    async def put(self, request: Request) -> Response:
        handler = parse_name(request.path_params["handler"], "handler")
        body = inputs.object_body(await inputs.read_json(request), LIMIT_FIELDS)
        try:
            # The store validates both numbers (types included) and names the field.
            query = rate_limits.set_rate_limit(handler, body.get("max"),  # type: ignore[arg-type]
                                               body.get("window_ms"))  # type: ignore[arg-type]
        except DefinitionError as error:
            field = "max" if error.field == "max_calls" else error.field
            raise DefinitionError(field, error.message) from None
        return json_response(shown(await run_query(self.node, query)))

    async def list(self, request: Request) -> Response:
        inputs.check_query(request, set())
        found = await run_query(self.node, rate_limits.list_rate_limits())
        return json_response({"rate_limits": [shown(limit) for limit in found]})

    async def delete(self, request: Request) -> Response:
        handler = parse_name(request.path_params["handler"], "handler")
        await run_query(self.node, rate_limits.delete_rate_limit(handler))
        return Response(status_code=204)


def routes(node: NodeView) -> list[BaseRoute]:
    endpoints = RateLimits(node)
    return [
        Route("/rate-limits", endpoints.list, methods=["GET"]),
        by_method("/rate-limits/{handler}", PUT=endpoints.put, DELETE=endpoints.delete),
    ]
