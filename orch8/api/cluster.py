"""Health probes and the cluster view: what load balancers and operators ask a node.

`/health/live` answers while the process runs. `/health/ready` answers 200 `ok` only
while the node is healthy as its heartbeat sees it: active, at least one of its workers
up, and the database answering the heartbeat. It turns 503 (the body says why) the moment
a drain begins, which is what takes the node out of a load balancer's rotation. It never
queries the database itself: through the API's pool it would measure the queue of
requests, and a busy node would report itself unready (and under load, every node would).
"""

from __future__ import annotations

import re
from datetime import UTC
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from orch8.api.errors import ApiError, json_response
from orch8.api.node import NodeView, run_query
from orch8.store import nodes

_NODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def routes(node: NodeView) -> list[BaseRoute]:
    """The health and cluster routes, bound to `node`."""

    async def live(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def ready(request: Request) -> Response:
        if not node.is_ready():
            return PlainTextResponse(node.unready_reason(), status_code=503)
        return PlainTextResponse("ok")

    async def list_nodes(request: Request) -> Response:
        rows = await run_query(node, nodes.list_nodes())
        return json_response([_node_body(row) for row in rows])

    async def drain(request: Request) -> Response:
        node_id = request.path_params["node_id"]
        if not _NODE_ID.match(node_id):
            raise ApiError(400, "node id must be 1-64 letters, digits, '-', '_' or '.'")
        if not await run_query(node, nodes.request_drain(node_id)):
            raise ApiError(404, f"no node {node_id!r} is registered")
        return Response(status_code=200)

    return [
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/cluster/nodes", list_nodes, methods=["GET"]),
        Route("/cluster/nodes/{node_id}/drain", drain, methods=["POST"]),
    ]


def _node_body(row: nodes.NodeRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "hostname": row.hostname,
        "started_at": _timestamp(row.started_at),
        "last_heartbeat": _timestamp(row.last_heartbeat),
        "state": row.state,
        "workers": row.workers,
        "instances_claimed": row.instances_claimed,
    }


def _timestamp(value: Any) -> str:
    # RFC 3339 in UTC with a Z, as the seed shows: "2024-01-15T08:00:00Z".
    return str(value.astimezone(UTC).isoformat().replace("+00:00", "Z"))
