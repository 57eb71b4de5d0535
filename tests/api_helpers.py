"""A running node for API, metrics and command-line tests, reached over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware

from orch8.api.auth import BearerAuth
from orch8.api.errors import exception_handlers
from orch8.api.node import ReportListener, WorkerReport
from orch8.api.workflows import routes
from orch8.config import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Served:
    url: str
    token: str | None

    def client(self, token: str | None = None) -> httpx.Client:
        chosen = self.token if token is None else token
        headers = {"Authorization": f"Bearer {chosen}"} if chosen else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


class PoolNode:
    """A node view with a real pool and no workers (until the supervisor serves tests)."""

    def __init__(self, pool: AsyncConnectionPool, settings: Settings) -> None:
        self.node_id = "api-test-node"
        self.settings = settings
        self.pool = pool
        self.latest: dict[int, WorkerReport] = {}
        self.listeners: list[ReportListener] = []

    def state(self) -> str:
        return "active"

    def is_ready(self) -> bool:
        return True

    def reports(self) -> list[WorkerReport]:
        return list(self.latest.values())

    def add_report_listener(self, listener: ReportListener) -> None:
        self.listeners.append(listener)


@contextmanager
def serve_in_thread(dsn: str, token: str | None = None) -> Iterator[Served]:
    port = free_port()
    stop: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False,
                                       kwargs={"autocommit": True}) as pool:
            node = PoolNode(pool, Settings(api_token=token))
            app = Starlette(routes=routes(node), exception_handlers=exception_handlers(),
                            middleware=[Middleware(BearerAuth, token=token)])
            config = Config()
            config.bind = [f"127.0.0.1:{port}"]
            config.accesslog = None
            event = asyncio.Event()
            stop.update(event=event, loop=asyncio.get_running_loop())
            started.set()
            await serve(app, config, shutdown_trigger=event.wait)  # type: ignore[arg-type]

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    started.wait(30)
    served = Served(f"http://127.0.0.1:{port}", token)
    _wait_until_up(served)
    try:
        yield served
    finally:
        stop["loop"].call_soon_threadsafe(stop["event"].set)
        thread.join(30)


def _wait_until_up(served: Served, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(served.url + "/openapi.json", timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Until a test needs the workers, an in-process server is enough for the endpoints.
serve_node = serve_in_thread
