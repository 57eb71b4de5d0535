"""Retry delays: exponential with full jitter, capped."""

from __future__ import annotations

import random

from orch8.model import RetryPolicy


def backoff_ms(policy: RetryPolicy, attempts_made: int, rng: random.Random | None = None) -> int:
    """Delay before the next attempt after `attempts_made` failures (1 = first failure).

    The ceiling grows as initial * multiplier^(n-1), capped at max_backoff_ms; the delay is
    drawn between half the ceiling and the ceiling, so retries of many instances that
    failed together (a downstream outage) do not all come back in the same millisecond.
    """
    ceiling = policy.initial_backoff_ms * policy.multiplier ** max(0, attempts_made - 1)
    ceiling = min(ceiling, policy.max_backoff_ms)
    draw = (rng or random).uniform(0.5, 1.0)
    return int(ceiling * draw)
