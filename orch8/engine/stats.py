"""Counters a process keeps: a worker's, reported to its supervisor, and the supervisor's own.

Each count is also written, as it happens, to this process's file in the node's metrics
directory (prometheus_client's multiprocess mode: a memory-mapped file per process) when
`PROMETHEUS_MULTIPROC_DIR` names one. The mapped page belongs to the kernel's page cache,
not to the process, so a worker killed with SIGKILL loses no count it made, and a report it
never got to send loses nothing either. The supervisor sums every file, of live and dead
processes alike, at each scrape (`orch8.api.metrics`). The cost of a count is one more store
into the mapping: no object per instance, no system call.

Histogram samples (step durations, claim lateness) still travel in the reports: they are
observations, not counts, and losing the last half second of them to a SIGKILL is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.values import MultiProcessValue

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Counter -> (metric name without `_total`, help text). The names are the public metrics.
COUNTER_METRICS = {
    "claimed": ("orch8_instances_claimed", "Instances claimed by this node's workers."),
    "steps_executed": ("orch8_steps_executed", "Step handler runs finished (any outcome)."),
    "completed": ("orch8_instances_completed", "Instances that completed."),
    "failed": ("orch8_instances_failed", "Instances that failed (moved to the dead letter)."),
    "retried": ("orch8_steps_retried", "Step attempts that failed and were scheduled again."),
    "delayed": ("orch8_steps_delayed", "Steps put back to wait out their delay_ms."),
    "released": ("orch8_instances_released",
                 "Claims this node gave back without finishing a step (a stopping worker, "
                 "or the supervisor releasing a dead worker's or a previous incarnation's)."),
    "fenced_rejected": ("orch8_fenced_writes_rejected",
                        "Writes refused because the claim had moved on (epoch fence)."),
    "rate_limited": ("orch8_steps_rate_limited", "Steps put back because their handler's "
                     "rate limit had no free call slot (not an attempt)."),
    # Counted by the supervisor.
    "worker_deaths": ("orch8_worker_deaths",
                      "Worker processes that ended unasked (crashed, killed, or exited)."),
    "worker_restarts": ("orch8_worker_restarts",
                        "Worker processes started in place of one that ended."),
}
COUNTERS = tuple(COUNTER_METRICS)


class _Value(Protocol):
    def inc(self, amount: float) -> None: ...


@dataclass
class WorkerStats:
    """Totals since the process started, plus observations not yet reported."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    step_seconds: list[float] = field(default_factory=list)
    claim_lateness_seconds: list[float] = field(default_factory=list)
    # The same counts in this process's metrics file; empty when there is no directory.
    durable: dict[str, _Value] = field(default_factory=dict)

    def add(self, counter: str, amount: int = 1) -> None:
        self.counts[counter] += amount
        if self.durable and amount:
            self.durable[counter].inc(amount)

    def take_observations(self) -> tuple[list[float], list[float]]:
        """Hand over (and forget) the histogram samples gathered since the last call."""
        steps, lateness = self.step_seconds, self.claim_lateness_seconds
        self.step_seconds, self.claim_lateness_seconds = [], []
        return steps, lateness


def process_stats() -> WorkerStats:
    """Stats for this process, written through to the node's metrics directory if it has one.

    Call it in the process that counts (after the fork): the file is named by its pid.
    """
    if not os.environ.get(METRICS_DIR_VARIABLE):
        return WorkerStats()
    value_class: Any = MultiProcessValue()  # type: ignore[no-untyped-call]
    durable = {
        name: value_class("counter", metric, f"{metric}_total", (), (), text)
        for name, (metric, text) in COUNTER_METRICS.items()
    }
    return WorkerStats(durable=durable)
