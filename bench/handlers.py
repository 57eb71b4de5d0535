"""Handlers the bench loads into its nodes with `ORCH8_HANDLERS=bench.handlers`."""

from __future__ import annotations

import time
from typing import Any

import orch8


@orch8.handler("bench_stamp")
def stamp(ctx: orch8.StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Record when the handler started (this host's clock), for the latency scenario."""
    return {"started_at": time.time()}
