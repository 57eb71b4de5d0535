"""systemd's readiness protocol (`Type=notify`), when the unit asks for it.

systemd passes a datagram socket in `NOTIFY_SOCKET`; the node says `READY=1` once every
worker is up and `STOPPING=1` when a drain or stop begins. Without the variable (any
other way of running the node) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("orch8.supervisor")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; return whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract-namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as error:
        log.warning("could not notify systemd (%s)", error)
        return False
    return True
