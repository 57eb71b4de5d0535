"""The dashboard's session cookie and CSRF token.

A browser cannot send a bearer header on navigation, so with `ORCH8_API_TOKEN` set the
page asks for the token once and answers with a cookie instead: `HttpOnly` (scripts
cannot read it), `SameSite=Strict` (other sites cannot ride on it), signed with a key
derived from the token (any node of the cluster accepts it; changing the token ends every
session). Without a token the key is random per process: the loopback-only bind protects
such a node, and a session still exists so that actions carry a CSRF token.

Every action is a POST that must carry `X-CSRF-Token`, an HMAC of the session id: a page
on another origin can make the browser send the cookie, but cannot read the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "orch8_ui"
LIFETIME_S = 12 * 3600


@dataclass(frozen=True)
class Session:
    id: str
    issued_at: int


class Sessions:
    """Issues and checks session cookies for one node."""

    def __init__(self, token: str | None) -> None:
        self.needs_login = token is not None
        self._token = token.encode() if token else None
        secret = self._token or secrets.token_bytes(32)
        # Derived, not the token itself: a leaked cookie signature says nothing of the token.
        self._key = hmac.new(secret, b"orch8 dashboard session v1", hashlib.sha256).digest()

    def token_matches(self, given: str) -> bool:
        """Constant-time check of a token typed into the login form."""
        return self._token is not None and hmac.compare_digest(given.encode(), self._token)

    def issue(self) -> str:
        """A new signed cookie value."""
        body = f"{secrets.token_urlsafe(16)}.{int(time.time())}"
        return f"{body}.{self._sign(body)}"

    def check(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, or None if it is missing, forged or expired."""
        if not cookie or cookie.count(".") != 2:
            return None
        session_id, issued, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{session_id}.{issued}")):
            return None
        if not issued.isdigit() or time.time() - int(issued) > LIFETIME_S:
            return None
        return Session(session_id, int(issued))

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.id}")

    def csrf_matches(self, session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.csrf_token(session))

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()
