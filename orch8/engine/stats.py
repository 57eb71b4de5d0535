"""Counters a process keeps: a worker's, reported to its supervisor, and the supervisor's own.

Each count is also written, as it happens, to this process's file in the node's metrics
directory when `PROMETHEUS_MULTIPROC_DIR` names one. The file is in prometheus_client's
multiprocess format, so its `MultiProcessCollector` sums the files of every process, live
and dead, at each scrape (`orch8.api.metrics`). It is a shared memory mapping: the counts
belong to the kernel's page cache, not to the process, so a worker killed with SIGKILL
loses no count it made, including those its last, never sent, report would have carried.

prometheus_client's own value class would cost a lock, a getpid() system call and a struct
pack per increment (about 15 times a dict increment); here a count is one store of a
double into the mapping, at a place found once when the file is made. The event-loop
thread is the only one that counts (handler threads never do), so no lock is needed.

Histogram observations (step durations, claim lateness) are folded into their buckets as
they are made (`Folding`: one bisect and two adds) and travel in the reports as bucket
counts and a sum, so a report's size does not grow with the rate, and the supervisor adds
a few numbers per report instead of observing every sample. Losing the last half second
of them to a SIGKILL is accepted.
"""

from __future__ import annotations

import mmap
import os
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.mmap_dict import MmapedDict, mmap_key

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Counter -> (metric name without `_total`, help text). The names are the public metrics.
COUNTER_METRICS = {
    "claimed": ("orch8_instances_claimed", "Instances claimed by this node's workers."),
    "claimed_with_finish": ("orch8_instances_claimed_with_finish",
                            "Of those claimed, the ones claimed by the statement that recorded "
                            "earlier steps' outcomes (one round trip; while a backlog lasts)."),
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

# Histogram bucket bounds, in seconds. Steps range from microseconds (noop) to minutes;
# lateness from milliseconds up.
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class Folded:
    """Observations folded into histogram buckets: `counts[i]` of them were at most
    `bounds[i]` and above the bound before it, the last count is of those above every
    bound; `sum` is their total."""

    counts: tuple[int, ...] = ()
    sum: float = 0.0


class Folding:
    """Where a process folds its observations as it makes them (see the module doc)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (`le`).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_each(self, values: Iterable[float]) -> None:
        """`observe` each of `values` (a batch's: one call, not one per value).

        Sorted first, so that each bucket costs one bisect into the values rather than
        each value one bisect into the bounds: a batch's values nearly all fall in its
        first bucket or two (three times faster for a batch of 100)."""
        ordered = sorted(values)
        counts, start, end = self.counts, 0, len(ordered)
        for bucket, bound in enumerate(self.bounds):
            if start == end:
                break
            # bisect_right: a value equal to a bound belongs to that bound's bucket (`le`).
            below = bisect_right(ordered, bound, start)
            counts[bucket] += below - start
            start = below
        else:
            counts[-1] += end - start
        self.total += sum(ordered)

    def take(self) -> Folded:
        """Hand over (and forget) what was observed since the last call."""
        folded = Folded(tuple(self.counts), self.total)
        self.counts = [0] * len(self.counts)
        self.total = 0.0
        return folded


class CountFile:
    """This process's counts, one double each in a file of the metrics directory."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, f"counter_{os.getpid()}.db")
        keys = {name: mmap_key(metric, f"{metric}_total", [], [], text)
                for name, (metric, text) in COUNTER_METRICS.items()}
        # Made whole under another name, then renamed: a scrape never sees half a file.
        making: Any = MmapedDict(f"{path}.new")  # type: ignore[no-untyped-call]
        for key in keys.values():
            making.write_value(key, 0.0, 0.0)
        making.close()
        os.rename(f"{path}.new", path)
        written: Any = MmapedDict.read_all_values_from_file
        places = {key: place for key, _, _, place in written(path)}
        with open(path, "r+b") as file:
            self._mapping = mmap.mmap(file.fileno(), 0)
        self.cells = memoryview(self._mapping).cast("d")
        # Entries are 8-byte aligned, so each value is one cell of the double view.
        self.cell_of = {name: places[key] // 8 for name, key in keys.items()}


@dataclass
class WorkerStats:
    """Totals since the process started, plus observations not yet reported."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    step_seconds: Folding = field(default_factory=lambda: Folding(STEP_BUCKETS))
    claim_lateness_seconds: Folding = field(default_factory=lambda: Folding(LATENESS_BUCKETS))
    # The same counts in this process's metrics file, if the node has a metrics directory.
    file: CountFile | None = None

    def add(self, counter: str, amount: int = 1) -> None:
        self.counts[counter] += amount
        if self.file is not None:
            self.file.cells[self.file.cell_of[counter]] += amount

    def take_observations(self) -> tuple[Folded, Folded]:
        """Hand over (and forget) the step durations and claim lateness folded since the
        last call."""
        return self.step_seconds.take(), self.claim_lateness_seconds.take()


def process_stats() -> WorkerStats:
    """Stats for this process, written through to the node's metrics directory if it has one.

    Call it in the process that counts (after the fork): the file is named by its pid.
    """
    directory = os.environ.get(METRICS_DIR_VARIABLE)
    return WorkerStats(file=CountFile(directory) if directory else None)
