"""Identifiers: time-ordered UUIDs for instances, readable ids for nodes."""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from typing import NewType

NodeId = NewType("NodeId", str)


def uuid7() -> uuid.UUID:
    """A version-7 UUID (RFC 9562): 48 bits of Unix milliseconds, then random bits.

    Ids sort by creation time, which keeps the primary-key index append-mostly and makes
    keyset pagination follow creation order. Python 3.11 has no uuid7 of its own.
    """
    milliseconds = time.time_ns() // 1_000_000
    value = (milliseconds & ((1 << 48) - 1)) << 80
    value |= secrets.randbits(80)
    value &= ~(0xF << 76)
    value |= 0x7 << 76  # version
    value &= ~(0x3 << 62)
    value |= 0x2 << 62  # RFC 4122 variant
    return uuid.UUID(int=value)


def new_node_id() -> NodeId:
    """A node id for when ORCH8_NODE_ID is unset: host name plus a short random suffix."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
    return NodeId(f"{host or 'node'}-{os.getpid()}-{secrets.token_hex(3)}")
