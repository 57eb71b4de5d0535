"""The app factory: one Starlette app per node, built around the node it serves.

Routes come from modules that each own one area: health and cluster (`cluster`),
workflows and rate limits (`workflows`, `rate_limits`), metrics (`metrics`).
Every error becomes a response in `errors`; `admission` bounds the requests in progress
and `auth` checks the bearer token.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from orch8.api import cluster, openapi, rate_limits, workflows
from orch8.api.admission import Admission, Gate
from orch8.api.auth import BearerAuth
from orch8.api.errors import exception_handlers
from orch8.api.metrics import metrics_route
from orch8.api.node import NodeView
from orch8.ui.routes import routes as ui_routes


def create_app(node: NodeView, gate: Gate | None = None) -> Starlette:
    """The node's HTTP API. No globals: everything it knows comes from `node`.

    `gate` is the server's admission state (the server closes it when it stops); by
    default one is made from the node's settings.
    """
    settings = node.settings
    gate = gate or Gate(settings.api_max_requests, settings.api_read_timeout_s)
    dashboard_routes, dashboard = ui_routes(node)
    return Starlette(
        routes=_routes(node) + dashboard_routes,
        exception_handlers=exception_handlers(),
        # Admission first: a refusal costs nothing, not even the token check.
        middleware=[Middleware(Admission, gate=gate),
                    Middleware(BearerAuth, token=settings.api_token)],
        lifespan=lambda app: dashboard.lifespan(),
    )


def _routes(node: NodeView) -> list[BaseRoute]:
    return [*cluster.routes(node), *workflows.routes(node), *rate_limits.routes(node),
            metrics_route(node), openapi.route()]
