"""Counters a worker keeps and reports to its supervisor."""

from __future__ import annotations

from dataclasses import dataclass, field

COUNTERS = (
    "claimed",
    "steps_executed",
    "completed",
    "failed",
    "retried",
    "delayed",
    "released",
    "fenced_rejected",
    "rate_limited",
)


@dataclass
class WorkerStats:
    """Totals since the worker started, plus observations not yet reported."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    step_seconds: list[float] = field(default_factory=list)
    claim_lateness_seconds: list[float] = field(default_factory=list)

    def add(self, counter: str, amount: int = 1) -> None:
        self.counts[counter] += amount

    def take_observations(self) -> tuple[list[float], list[float]]:
        """Hand over (and forget) the histogram samples gathered since the last call."""
        steps, lateness = self.step_seconds, self.claim_lateness_seconds
        self.step_seconds, self.claim_lateness_seconds = [], []
        return steps, lateness
