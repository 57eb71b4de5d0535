"""Health probes and the cluster view: what load balancers and operators ask a node.

`/health/live` answers while the process runs. `/health/ready` answers 200 `ok` only
while the node is active, at least one of its workers is up and its database answers; it
turns 503 (the body says why) the moment a drain begins, which is what takes the node out
of a load balancer's rotation.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC
from typing import Any

import orjson
import psycopg
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from orch8.api.node import NodeView
from orch8.store import nodes
from orch8.store.query import Query

# Readiness must answer fast even when the database does not.
PING_TIMEOUT_S = 2.0
_NODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def routes(node: NodeView) -> list[BaseRoute]:
    """The health and cluster routes, bound to `node`."""

    async def live(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def ready(request: Request) -> Response:
        if not node.is_ready():
            return PlainTextResponse(node.unready_reason(), status_code=503)
        if not await _database_answers(node):
            return PlainTextResponse("database unreachable", status_code=503)
        return PlainTextResponse("ok")

    async def list_nodes(request: Request) -> Response:
        rows = await _query(node, nodes.list_nodes())
        return _json([_node_body(row) for row in rows])

    async def drain(request: Request) -> Response:
        node_id = request.path_params["node_id"]
        if not _NODE_ID.match(node_id):
            return error(400, "node id must be 1-64 letters, digits, '-', '_' or '.'")
        if not await _query(node, nodes.request_drain(node_id)):
            return error(404, f"no node {node_id!r} is registered")
        return Response(status_code=200)

    return [
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/cluster/nodes", list_nodes, methods=["GET"]),
        Route("/cluster/nodes/{node_id}/drain", drain, methods=["POST"]),
    ]


class DatabaseUnavailable(Exception):
    """The node's database did not answer; the app turns this into a JSON 503."""


async def _query(node: NodeView, query: Query[Any]) -> Any:
    try:
        async with node.pool.connection(timeout=PING_TIMEOUT_S * 2) as conn:
            return await query.run_async(conn)
    except (psycopg.OperationalError, PoolTimeout) as error:
        raise DatabaseUnavailable(str(error)) from None


async def _database_answers(node: NodeView) -> bool:
    async def ping() -> None:
        # A pooled connection can die under the ping (the database restarted, or its
        # connections were cut) while the database answers: only a second, new connection
        # failing too means it is unreachable.
        try:
            async with node.pool.connection(timeout=PING_TIMEOUT_S) as conn:
                await conn.execute("SELECT 1")
        except psycopg.OperationalError:
            async with node.pool.connection(timeout=PING_TIMEOUT_S) as conn:
                await conn.execute("SELECT 1")

    try:
        await asyncio.wait_for(ping(), PING_TIMEOUT_S)
    except (psycopg.Error, PoolTimeout, TimeoutError, OSError):
        return False
    return True


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


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               503: "unavailable"}


def error(status: int, detail: str) -> Response:
    """The API's one error shape: `{"error": <code>, "detail": <sentence>}`."""
    return _json({"error": ERROR_CODES.get(status, "error"), "detail": detail}, status)
