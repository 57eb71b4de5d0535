"""The app factory: one Starlette app per node, built around the node it serves.

Routes come from modules that each own one area: health and cluster (`cluster`),
workflows (`workflows`), metrics (`metrics`). The last two and the shared error
handlers and bearer-token middleware are plugged in when their modules are present, so
the node serves health and cluster routes even in a build without them.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from orch8.api import cluster
from orch8.api.node import NodeView
from orch8.database import redact
from orch8.ui.routes import routes as ui_routes

log = logging.getLogger("orch8.api")


def create_app(node: NodeView) -> Starlette:
    """The node's HTTP API. No globals: everything it knows comes from `node`."""
    dashboard_routes, dashboard = ui_routes(node)
    return Starlette(
        routes=_routes(node) + dashboard_routes,
        exception_handlers=_exception_handlers(),
        middleware=_middleware(node),
        lifespan=lambda app: dashboard.lifespan(),
    )


def _routes(node: NodeView) -> list[BaseRoute]:
    found: list[BaseRoute] = list(cluster.routes(node))
    try:
        from orch8.api.workflows import routes as workflow_routes
    except ImportError:
        log.debug("workflow routes not available in this build")
    else:
        found.extend(workflow_routes(node))
    try:
        from orch8.metrics import metrics_route
    except ImportError:
        log.debug("metrics not available in this build")
    else:
        found.append(metrics_route(node))
    return found


def _middleware(node: NodeView) -> list[Middleware]:
    try:
        from orch8.api.auth import BearerAuth
    except ImportError:
        return []
    return [Middleware(BearerAuth, token=node.settings.api_token)]


def _exception_handlers() -> dict[Any, Any]:
    try:
        from orch8.api.errors import exception_handlers
    except ImportError:
        handlers: dict[Any, Any] = {HTTPException: _http_error, Exception: _unexpected}
    else:
        handlers = exception_handlers()
    handlers[cluster.DatabaseUnavailable] = _database_unavailable
    return handlers


async def _http_error(request: Request, error: Exception) -> Response:
    # Starlette's own 404 (no route) and 405 (wrong method) arrive here.
    assert isinstance(error, HTTPException)
    return cluster.error(error.status_code, str(error.detail))


async def _database_unavailable(request: Request, error: Exception) -> Response:
    log.warning("database unavailable for %s %s: %s", request.method, request.url.path,
                redact(str(error)))
    return cluster.error(503, "the database is unreachable; try again shortly")


async def _unexpected(request: Request, error: Exception) -> Response:
    log.error("unhandled error on %s %s: %r", request.method, request.url.path,
              redact(repr(error)))
    return cluster.error(500, "internal error; see the node's log")
