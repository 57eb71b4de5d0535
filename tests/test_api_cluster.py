"""The health and cluster routes in process, over a real pool (reachable or not)."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from psycopg_pool import AsyncConnectionPool
from supervisor_process import free_port

from orch8.api.app import create_app
from orch8.api.node import ReportListener, WorkerReport
from orch8.config import Settings
from orch8.store import nodes


@dataclass
class StaticNode:
    """A NodeView whose state the test sets; the pool is a real one."""

    pool: AsyncConnectionPool
    node_id: str = "n1"
    settings: Settings = field(default_factory=Settings)
    phase: str = "active"
    ready: bool = True
    # No process counts here: an empty directory of its own for /metrics to sum.
    metrics_dir: str = field(default_factory=tempfile.mkdtemp)

    def state(self) -> str:
        return self.phase

    def is_ready(self) -> bool:
        return self.ready

    def unready_reason(self) -> str:
        return self.phase if self.phase != "active" else "not ready"

    def reports(self) -> list[WorkerReport]:
        return []

    def add_report_listener(self, listener: ReportListener) -> None:
        pass


def with_app(dsn: str, test: Callable[[httpx.AsyncClient, StaticNode], Awaitable[None]],
             **node: Any) -> None:
    async def run() -> None:
        pool = AsyncConnectionPool(dsn, min_size=0, max_size=2, open=False,
                                   kwargs={"autocommit": True})
        await pool.open(wait=False)
        view = StaticNode(pool, **node)
        transport = httpx.ASGITransport(app=create_app(view))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
                await test(client, view)
        finally:
            await pool.close()

    asyncio.run(run())


def register(conn: psycopg.Connection[Any], node_id: str) -> None:
    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True) as own:
            await nodes.register(own, node_id, uuid.uuid4(), "host", 1, 2, 60)

    asyncio.run(run())


def test_ready_and_live(dsn: str) -> None:
    async def test(client: httpx.AsyncClient, view: StaticNode) -> None:
        assert (await client.get("/health/live")).text == "ok"
        ready = await client.get("/health/ready")
        assert (ready.status_code, ready.text) == (200, "ok")
        view.phase, view.ready = "draining", False
        ready = await client.get("/health/ready")
        assert (ready.status_code, ready.text) == (503, "draining")

    with_app(dsn, test)


def test_ready_follows_the_node_not_the_api_pool() -> None:
    # Readiness is the node's own view (its heartbeat's): it never waits on the API's
    # pool, whose queue under load would take a healthy node out of rotation.
    unreachable = f"host=127.0.0.1 port={free_port()} dbname=x connect_timeout=1"

    async def test(client: httpx.AsyncClient, view: StaticNode) -> None:
        ready = await client.get("/health/ready")
        assert (ready.status_code, ready.text) == (200, "ok")
        view.ready = False
        ready = await client.get("/health/ready")
        assert (ready.status_code, ready.text) == (503, "not ready")
        listed = await client.get("/cluster/nodes")
        assert listed.status_code == 503 and listed.json()["error"] == "unavailable"
        assert listed.headers["retry-after"] == "1"

    with_app(unreachable, test)


def test_cluster_nodes_and_drain(dsn: str, conn: psycopg.Connection[Any]) -> None:
    register(conn, "n1")

    async def test(client: httpx.AsyncClient, view: StaticNode) -> None:
        [listed] = (await client.get("/cluster/nodes")).json()
        assert set(listed) >= {"id", "hostname", "started_at", "last_heartbeat", "state",
                               "instances_claimed"}
        assert (listed["id"], listed["state"], listed["instances_claimed"]) == ("n1", "active", 0)
        drained = await client.post("/cluster/nodes/n1/drain")
        assert (drained.status_code, drained.content) == (200, b"")
        assert (await client.post("/cluster/nodes/n1/drain")).status_code == 200
        [listed] = (await client.get("/cluster/nodes")).json()
        assert listed["state"] == "draining"

    with_app(dsn, test)


def test_bad_requests_are_json_4xx(dsn: str) -> None:
    async def test(client: httpx.AsyncClient, view: StaticNode) -> None:
        cases = [
            (await client.post("/cluster/nodes/nobody/drain"), 404),
            (await client.post("/cluster/nodes/not%20an%20id/drain"), 400),
            (await client.post("/cluster/nodes/" + "x" * 65 + "/drain"), 400),
            (await client.get("/cluster/nodes/n1/drain"), 405),
            (await client.delete("/cluster/nodes"), 405),
            (await client.get("/cluster/nodes/n1/drain/extra"), 404),
            (await client.get("/health/nothing"), 404),
        ]
        for response, status in cases:
            assert response.status_code == status, response.request.url
            assert set(response.json()) == {"error", "detail"}

    with_app(dsn, test)
