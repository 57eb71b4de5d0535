"""The dashboard's routes: one page, the fragments it refreshes, and two actions.

`GET /ui` is the page; its script fetches `GET /ui/panels` every few seconds and swaps
the fragment in, and `GET /ui/instances/{id}` on a look-up. `POST /ui/nodes/{id}/drain`
and `POST /ui/instances/{id}/retry` act through the same store queries as the JSON API.
Every response carries a strict Content-Security-Policy: scripts and styles only from
this node, nothing inline, no framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jinja2
import psycopg
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from orch8.api.errors import error_response, json_response
from orch8.api.node import NodeView
from orch8.errors import Conflict, NotFound
from orch8.model import State
from orch8.store import concurrency, instances, nodes, rate_limits, sequences
from orch8.ui.chart import throughput_chart
from orch8.ui.session import COOKIE, LIFETIME_S, Session, Sessions
from orch8.ui.throughput import Throughput

REFRESH_MS = 2000
DEAD_LETTER_ROWS = 10
QUERY_TIMEOUT_S = 2.0
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """The dashboard of one node: its sessions, templates and throughput history."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.sessions = Sessions(node.settings.api_token)
        self.throughput = Throughput()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("orch8.ui", "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined)

    def routes(self) -> list[BaseRoute]:
        static = StaticFiles(packages=[("orch8.ui", "static")])
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/ui", self.signed_in(self.page), methods=["GET"]),
            Route("/ui/login", self.login_form, methods=["GET"]),
            Route("/ui/login", self.login, methods=["POST"]),
            Route("/ui/logout", self.logout, methods=["POST"]),
            Route("/ui/panels", self.signed_in(self.panels), methods=["GET"]),
            Route("/ui/instances/{id}", self.signed_in(self.instance), methods=["GET"]),
            Route("/ui/nodes/{node_id}/drain", self.action(self.drain), methods=["POST"]),
            Route("/ui/instances/{id}/retry", self.action(self.retry), methods=["POST"]),
            Mount("/ui/static", static, name="ui-static"),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Sample the cluster's counters for as long as the app is served."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.throughput.run(self.node.pool, stop),
                                   name="ui-throughput")
        try:
            yield
        finally:
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- sessions --------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        return self.sessions.check(request.cookies.get(COOKIE))

    def signed_in(self, handler: Callable[[Request, Session], Awaitable[Response]]) -> Handler:
        """Run `handler` with the caller's session; start one, or ask for the token."""

        async def guarded(request: Request) -> Response:
            session = self.session(request)
            if session is not None:
                return await _unless_down(handler(request, session))
            if self.sessions.needs_login:
                if request.url.path == "/ui":
                    return _secure(RedirectResponse("/ui/login", status_code=303))
                return _secure(error_response(401, "sign in at /ui/login first"))
            # No token: the loopback-only bind protects the node; a session still carries
            # the CSRF token the actions need.
            cookie = self.sessions.issue()
            response = await _unless_down(
                handler(request, self.sessions.check(cookie) or _never()))
            return _with_cookie(response, cookie, request)

        return guarded

    def action(self, handler: Callable[[Request], Awaitable[Response]]) -> Handler:
        """A state-changing POST: a valid session and its CSRF token, or 403."""

        async def guarded(request: Request) -> Response:
            session = self.session(request)
            if session is None:
                return _secure(error_response(401, "sign in at /ui/login first"))
            if not self.sessions.csrf_matches(session, request.headers.get("x-csrf-token")):
                return _secure(error_response(403, "missing or wrong CSRF token"))
            return _secure(await _unless_down(handler(request)))

        return guarded

    # --- pages -----------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return _secure(RedirectResponse("/ui", status_code=307))

    async def login_form(self, request: Request) -> Response:
        if not self.sessions.needs_login:
            return _secure(RedirectResponse("/ui", status_code=303))
        return self.render("login.html", {"failed": False})

    async def login(self, request: Request) -> Response:
        form = await request.form()
        given = form.get("token")
        if not self.sessions.needs_login:
            return _secure(RedirectResponse("/ui", status_code=303))
        if not isinstance(given, str) or not self.sessions.token_matches(given.strip()):
            return self.render("login.html", {"failed": True}, status=401)
        response = _secure(RedirectResponse("/ui", status_code=303))
        return _with_cookie(response, self.sessions.issue(), request)

    async def logout(self, request: Request) -> Response:
        response = _secure(RedirectResponse("/ui/login", status_code=303))
        response.delete_cookie(COOKIE, path="/ui")
        return response

    async def page(self, request: Request, session: Session) -> Response:
        context = await self.panel_context()
        context |= {"csrf_token": self.sessions.csrf_token(session),
                    "needs_login": self.sessions.needs_login, "refresh_ms": REFRESH_MS}
        return self.render("page.html", context)

    async def panels(self, request: Request, session: Session) -> Response:
        return self.render("panels.html", await self.panel_context())

    async def instance(self, request: Request, session: Session) -> Response:
        try:
            instance_id = uuid.UUID(request.path_params["id"])
        except ValueError:
            return self.render("instance.html", {"problem": "not an instance id"}, 400)
        try:
            found = await self.query(instances.get_instance(instance_id))
        except NotFound:
            return self.render("instance.html", {"problem": f"no instance {instance_id}"}, 404)
        sequence = await self.query(
            sequences.get_sequence(found.sequence_name, found.sequence_version))
        return self.render("instance.html", {"problem": None, "instance": found,
                                             "steps": _step_rows(found, sequence.steps)})

    # --- actions ---------------------------------------------------------------------

    async def drain(self, request: Request) -> Response:
        node_id = request.path_params["node_id"]
        if not await self.query(nodes.request_drain(node_id)):
            return error_response(404, f"no node {node_id!r} is registered")
        return json_response({"drain_requested": node_id})

    async def retry(self, request: Request) -> Response:
        try:
            instance_id = uuid.UUID(request.path_params["id"])
            await self.query(instances.retry_instance(instance_id))
        except ValueError:
            return error_response(400, "not an instance id")
        except NotFound as error:
            return error_response(404, str(error))
        except Conflict as error:
            return error_response(409, str(error))
        return json_response({"retried": str(instance_id)})

    # --- helpers ---------------------------------------------------------------------

    async def panel_context(self) -> dict[str, Any]:
        """Everything the panels show: each a bounded, index-backed query."""
        settings = self.node.settings
        return {
            "node_id": self.node.node_id,
            "nodes": await self.query(nodes.list_nodes()),
            "heartbeat_s": settings.heartbeat_interval_s,
            "stale_s": settings.stale_threshold_s,
            "queue": await self.query(instances.queue_depth()),
            "oldest_due_s": await self.query(instances.oldest_due_age()),
            "chart": throughput_chart(self.throughput.points()),
            "dead_letter": await self.query(instances.list_instances(
                state=State.FAILED, limit=DEAD_LETTER_ROWS)),
            "rate_limits": await self.query(rate_limits.list_rate_limits()),
            "busy_keys": await self.query(concurrency.busy_keys()),
        }

    async def query(self, query: Any) -> Any:
        try:
            async with self.node.pool.connection(timeout=QUERY_TIMEOUT_S) as conn:
                return await query.run_async(conn)
        except (psycopg.OperationalError, PoolTimeout) as error:
            raise DatabaseDown(str(error)) from None

    def render(self, name: str, context: dict[str, Any], status: int = 200) -> Response:
        body = self.templates.get_template(name).render(context)
        return _secure(HTMLResponse(body, status_code=status))


class DatabaseDown(Exception):
    """The database did not answer; the page shows a 503 instead of its panels."""


def routes(node: NodeView) -> tuple[list[BaseRoute], Dashboard]:
    """The dashboard's routes for `node`, and the dashboard (for the app's lifespan)."""
    dashboard = Dashboard(node)
    return dashboard.routes(), dashboard


def _step_rows(found: instances.Instance, steps: Any) -> list[dict[str, Any]]:
    outputs = found.outputs or {}
    rows = []
    for index, step in enumerate(steps):
        if step.id in outputs:
            status = "done"
        elif index == found.step_index and found.state not in (State.COMPLETED,):
            status = str(found.state)
        else:
            status = "pending"
        current = index == found.step_index and status != "done"
        rows.append({"id": step.id, "handler": step.handler, "status": status,
                     "attempts": found.attempt if current else None,
                     "output": outputs.get(step.id),
                     "error": found.last_error if current else None})
    return rows


async def _unless_down(pending: Awaitable[Response]) -> Response:
    try:
        return await pending
    except DatabaseDown:
        return _secure(error_response(503, "the database is unreachable; try again shortly",
                                      {"Retry-After": "2"}))


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _with_cookie(response: Response, cookie: str, request: Request) -> Response:
    response.set_cookie(COOKIE, cookie, max_age=LIFETIME_S, path="/ui", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


def _never() -> Session:
    raise AssertionError("a freshly issued cookie always checks")
