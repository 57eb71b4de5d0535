"""The supervisor's phase: where the node is in its life."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    STARTING = "starting"
    ACTIVE = "active"
    # Graceful: no new claims, in-flight steps finish, then the node leaves.
    DRAINING = "draining"
    # Quick: what runs is cancelled and released, then the node leaves.
    STOPPING = "stopping"

    @property
    def leaving(self) -> bool:
        return self in (Phase.DRAINING, Phase.STOPPING)
