"""The node's HTTP API, served by hypercorn inside the supervisor's event loop.

The supervisor owns the signals: hypercorn gets our `stopped` event as its shutdown
trigger and installs no handlers of its own, so /health/ready keeps answering 503 for
the whole of a drain and the server goes only after the node has deregistered.
"""

from __future__ import annotations

import asyncio
import logging

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from orch8.api.app import create_app
from orch8.api.node import NodeView

# In-flight requests get this long once the node has left.
GRACEFUL_TIMEOUT_S = 2.0


def listen(bind: str) -> str:
    """Bind the API's address now, before the node registers or starts a worker.

    A taken port then fails start-up cleanly instead of after the workers are up. Returns
    an `fd://` address through which hypercorn adopts the socket (and its ownership).
    Raises `OSError` when the address cannot be bound.
    """
    config = Config()
    config.bind = [bind]
    sockets = config.create_sockets()
    [sock] = sockets.insecure_sockets
    return f"fd://{sock.detach()}"


def config_for(bind: str, log_level: str) -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.loglevel = log_level
    # A Logger (not a path) makes hypercorn log through our handlers instead of its own.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(node: NodeView, address: str, stopped: asyncio.Event) -> None:
    """Serve the API on `address` (from `listen`) until `stopped` is set."""
    config = config_for(address, node.settings.log_level)
    await hypercorn_serve(create_app(node), config,  # type: ignore[arg-type]
                          shutdown_trigger=stopped.wait)
