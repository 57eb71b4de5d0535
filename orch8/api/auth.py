"""Bearer-token authentication for every endpoint but the health probes and the dashboard.

With `ORCH8_API_TOKEN` set, a request must carry `Authorization: Bearer <token>`; the
comparison is constant-time so response timing tells nothing about how much of a guess
was right. Health probes stay open: load balancers and orchestrators call them without
credentials, and they reveal nothing but up or down.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from orch8.api.errors import error_response

OPEN_PREFIXES = ("/health/",)
# The dashboard checks its own session cookie (a browser cannot send a bearer header on
# navigation); `/` only redirects to it.
DASHBOARD_PATHS = ("/", "/ui")
DASHBOARD_PREFIX = "/ui/"


class BearerAuth:
    """ASGI middleware: refuse (401) any non-health request without the right token.

    With no token configured it passes everything through; the loopback-only bind
    (`orch8.api.security.check_bind`) is what protects such a node.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or _is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            response = error_response(401, "missing or wrong bearer token",
                                      {"WWW-Authenticate": 'Bearer realm="orch8"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.expected is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                return hmac.compare_digest(given.strip(), self.expected)
        return False


def _is_open(path: str) -> bool:
    return (path.startswith(OPEN_PREFIXES) or path in DASHBOARD_PATHS
            or path.startswith(DASHBOARD_PREFIX))
