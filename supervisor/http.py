"""The node's HTTP API, served by hypercorn inside the supervisor's event loop.

The supervisor owns the signals: hypercorn gets our `stopped` event as its shutdown
trigger and installs no handlers of its own, so /health/ready keeps answering 503 for
the whole of a drain and the server goes only after the node has deregistered. Then the
admission gate (`orch8.api.admission`) answers what is left: requests in progress get
`GRACEFUL_TIMEOUT_S`, the rest the JSON 503, and the log gets one line of counts.
"""

from __future__ import annotations

import asyncio
import logging

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from orch8.api.admission import Gate
from orch8.api.app import create_app
from orch8.api.node import NodeView
from orch8.config import Settings

log = logging.getLogger("orch8.api")

# In-progress requests get this long once the node has left.
GRACEFUL_TIMEOUT_S = 2.0
# Hypercorn's own limit comes later, so our gate (which answers in JSON) acts first.
HYPERCORN_GRACE_S = GRACEFUL_TIMEOUT_S + 1.0
KEEP_ALIVE_S = 5.0


def listen(bind: str, backlog: int = Settings.api_backlog) -> str:
    """Bind the API's address now, before the node registers or starts a worker.

    A taken port then fails start-up cleanly instead of after the workers are up. Returns
    an `fd://` address through which hypercorn adopts the socket (and its ownership).
    Raises `OSError` when the address cannot be bound.
    """
    config = Config()
    config.bind = [bind]
    config.backlog = backlog
    sockets = config.create_sockets()
    [sock] = sockets.insecure_sockets
    sock.listen(backlog)
    return f"fd://{sock.detach()}"


def config_for(bind: str, settings: Settings) -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.graceful_timeout = HYPERCORN_GRACE_S
    # The kernel caps the backlog at net.core.somaxconn.
    config.backlog = settings.api_backlog
    # A connection that sends no request (silent, or trickling its headers) is closed
    # after this. The body has its own limit in the app (api_read_timeout_s).
    config.keep_alive_timeout = KEEP_ALIVE_S
    # hypercorn's read_timeout stays off: it also runs while the app works on a request,
    # so it would cut off any answer slower than it.
    config.read_timeout = None
    config.loglevel = settings.log_level
    # A Logger (not a path) makes hypercorn log through our handlers instead of its own.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(node: NodeView, address: str, stopped: asyncio.Event) -> None:
    """Serve the API on `address` (from `listen`) until `stopped` is set."""
    settings = node.settings
    gate = Gate(settings.api_max_requests, settings.api_read_timeout_s)

    async def shutdown() -> None:
        await stopped.wait()
        gate.close(GRACEFUL_TIMEOUT_S)

    app = create_app(node, gate)
    await hypercorn_serve(app, config_for(address, settings),  # type: ignore[arg-type]
                          shutdown_trigger=shutdown)
    closing = gate.closing_summary()
    log.info("API closed: %d requests in progress finished, %d cancelled after %.0f s, "
             "%d refused while closing (%d refused as busy while serving)", closing.finished,
             closing.cancelled, GRACEFUL_TIMEOUT_S, closing.refused, gate.refused_busy)
