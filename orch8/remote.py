"""`Remote`: the command line's HTTP connection to a node (`ORCH8_URL`, `ORCH8_API_TOKEN`).

Standard library only (urllib), so the command line needs nothing beyond orch8 itself.
Every failure becomes a `RemoteError` with one line fit for a terminal: the server's
`detail` when it sent one, or what went wrong on the way there. The token is sent in a
header and never appears in a message.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import orjson

from orch8.errors import Orch8Error

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 30.0


class RemoteError(Orch8Error):
    """The node refused the request or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def is_http_url(url: str) -> bool:
    """Whether `url` is an http(s) address with a host (what urllib can reach)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class Remote:
    """One node's API, called with JSON in and JSON out."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        chosen = url if url is not None else os.environ.get("ORCH8_URL") or DEFAULT_URL
        if not is_http_url(chosen):
            raise RemoteError(f"the node's address must be an http:// or https:// URL, "
                              f"not {chosen!r}")
        self.url = chosen.rstrip("/")
        given = token if token is not None else os.environ.get("ORCH8_API_TOKEN")
        self._token = given or None

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"  # never the token

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(self, method: str, path: str, body: Any = None,
                query: Mapping[str, Any] | None = None) -> Any:
        """Send one request; the decoded JSON answer (None if empty), or `RemoteError`."""
        target = self.url + path
        present = {key: value for key, value in (query or {}).items() if value is not None}
        if present:
            target += "?" + urllib.parse.urlencode(present)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(target, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return _decode(response.read())
        except urllib.error.HTTPError as error:
            raise _http_error(error) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RemoteError(f"cannot reach {self.url}: {reason}") from None


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


def _http_error(error: urllib.error.HTTPError) -> RemoteError:
    """The server's own one-line detail, with the status for context."""
    try:
        body = orjson.loads(error.read())
        detail = body.get("detail") or body.get("error") if isinstance(body, dict) else None
    except (orjson.JSONDecodeError, OSError):
        detail = None
    detail = detail or error.reason or "request failed"
    if error.code == 401:
        detail = f"{detail} (set ORCH8_API_TOKEN to the node's token)"
    return RemoteError(f"{detail} (HTTP {error.code})", error.code)
