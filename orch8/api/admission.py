"""Admission: how many requests the API works on at once, and what the rest are told.

Past `limit` requests in progress, a request is refused at once with the JSON 503 and
`Retry-After`, instead of queueing: a queue only grows latency to connections ÷
throughput, and runs requests whose clients have long given up. Health probes and
`/metrics` are never gated: readiness reports the node's health, not its queue.

When the server closes, new requests get the same 503 and those in progress get
`grace_s` seconds; any still running then are cancelled here (not by hypercorn, whose
cancellation ends in empty 500s and a traceback per request) and, if nothing was sent
yet, answered with the JSON 503. The counts go to the log in one line.

The body of an admitted request must arrive within `read_timeout_s` (408 otherwise):
hypercorn's read timeout is per read, so a body sent a byte a second never trips it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orch8.api.errors import ApiError, error_response

UNGATED_PREFIXES = ("/health/", "/metrics")
RETRY_AFTER_S = 1
# A refused request's body is read and dropped up to this size, so its connection can
# carry the retry; past it (or a slow body) the answer closes the connection instead.
DRAIN_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Closing:
    """What happened to requests while the server closed."""

    finished: int  # in progress at close, answered normally
    cancelled: int  # still running after the grace, answered 503 (or cut if mid-answer)
    refused: int  # arrived after close, answered 503


class Gate:
    """The admission state of one server: requests in progress and the close."""

    def __init__(self, limit: int, read_timeout_s: float) -> None:
        self.limit = limit
        self.read_timeout_s = read_timeout_s
        self.active = 0
        self.refused_busy = 0
        self._deadlines: set[asyncio.Timeout] = set()
        self._closed_at_active: int | None = None
        self._cancelled = 0
        self._refused_closing = 0

    @property
    def closing(self) -> bool:
        return self._closed_at_active is not None

    def close(self, grace_s: float) -> None:
        """Refuse new requests; cancel those in progress after `grace_s` seconds."""
        self._closed_at_active = self.active
        when = asyncio.get_running_loop().time() + grace_s
        for deadline in self._deadlines:
            deadline.reschedule(when)

    def closing_summary(self) -> Closing:
        at_close = self._closed_at_active or 0
        return Closing(at_close - self._cancelled, self._cancelled, self._refused_closing)

    def enter(self, deadline: asyncio.Timeout) -> None:
        """A request is admitted; `deadline` is what `close` shortens."""
        self.active += 1
        self._deadlines.add(deadline)

    def leave(self, deadline: asyncio.Timeout) -> None:
        self._deadlines.discard(deadline)
        self.active -= 1
        if deadline.expired():
            self._cancelled += 1

    def refusal(self) -> ApiError | None:
        """Why a new request is refused, if it is (and count it)."""
        if self.closing:
            self._refused_closing += 1
            return _unavailable("the node is shutting down; retry on another node")
        if self.active >= self.limit:
            self.refused_busy += 1
            return _unavailable(f"the node is busy; retry after {RETRY_AFTER_S} s")
        return None


class Admission:
    """ASGI middleware that holds every gated request to its `Gate`."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNGATED_PREFIXES):
            await self.app(scope, receive, send)
            return
        refused = self.gate.refusal()
        if refused is not None:
            await _refuse(refused, scope, receive, send, self.gate.read_timeout_s)
            return
        await self._admit(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        answering = _Answering(send)
        bounded = _bounded(receive, self.gate.read_timeout_s)
        deadline = asyncio.timeout(None)
        self.gate.enter(deadline)
        try:
            async with deadline:
                await self.app(scope, bounded, answering.send)
        except TimeoutError:
            if not deadline.expired():
                raise
            if not answering.started:
                await _answer(_unavailable("the node shut down before answering; retry "
                                           "on another node"), scope, receive, send)
        finally:
            self.gate.leave(deadline)


class _Answering:
    """Passes messages on, noting whether the response has begun."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _bounded(receive: Receive, seconds: float) -> Receive:
    """`receive`, but the request body must be complete within `seconds` of the app first
    asking for it (408)."""
    deadline: float | None = None
    complete = False

    async def bounded() -> Message:
        nonlocal complete, deadline
        if complete:  # past the body, receive waits for the disconnect: no deadline
            return await receive()
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + seconds
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {seconds:g} s",
                           {"Connection": "close"}) from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded


async def _refuse(error: ApiError, scope: Scope, receive: Receive, send: Send,
                  read_timeout_s: float) -> None:
    # Answering before the body is read would leave the connection unusable (hypercorn
    # closes it once the answer is sent, and a client reusing it sees a reset).
    if not await _drained(receive, read_timeout_s):
        error.headers["Connection"] = "close"
    await _answer(error, scope, receive, send)


async def _drained(receive: Receive, seconds: float) -> bool:
    """Read and drop a small request body; whether all of it came in time."""
    received = 0
    try:
        async with asyncio.timeout(seconds):
            while received <= DRAIN_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return False
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        pass
    return False


def _unavailable(detail: str) -> ApiError:
    return ApiError(503, detail, {"Retry-After": str(RETRY_AFTER_S)})


async def _answer(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(error.status, error.detail, error.headers)(scope, receive, send)
