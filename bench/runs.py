"""Interleaved repetitions and their statistics.

The machine is shared and its speed drifts by 15 % or more between minutes, so systems
compared with each other are measured in turn within each repetition (A B C, A B C, ...),
each figure is stored with the load average at the moment it was taken, and a ratio is
taken between figures of the same repetition before its median is reported.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One timed drain: `count` instances given, `completed` of them done in `seconds`."""

    count: int
    completed: int
    seconds: float
    complete: bool
    steps: int = 1

    @property
    def per_s(self) -> float:
        if not self.seconds > 0:
            return float("nan")
        return self.completed / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "completed": self.completed, "seconds": self.seconds,
                "complete": self.complete, "steps": self.steps, "per_s": self.per_s}


@dataclass
class Run:
    """Everything one scenario measured: one record per figure, and its summary."""

    scenario: str
    reps: int
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, label: str, rep: int, value: float, **detail: Any) -> None:
        record = {"label": label, "rep": rep, "value": value,
                  "load_1m": os.getloadavg()[0], **detail}
        self.records.append(record)
        print(f"  {self.scenario} rep {rep + 1}/{self.reps}: {label}: {value:,.1f} "
              f"(load {record['load_1m']:.2f})", file=sys.stderr, flush=True)

    def labels(self) -> list[str]:
        return list(dict.fromkeys(record["label"] for record in self.records))

    def values(self, label: str) -> list[float]:
        return [record["value"] for record in self.records if record["label"] == label]

    def stats(self, label: str) -> dict[str, Any]:
        return spread(self.values(label))

    def ratio(self, numerator: str, denominator: str) -> dict[str, Any]:
        """`numerator / denominator`, taken within each repetition, then summarised."""
        by_rep: dict[int, dict[str, float]] = {}
        for record in self.records:
            if record["label"] in (numerator, denominator):
                by_rep.setdefault(record["rep"], {})[record["label"]] = record["value"]
        return spread(pair[numerator] / pair[denominator] for pair in by_rep.values()
                      if len(pair) == 2 and pair[denominator])

    def as_json(self) -> dict[str, Any]:
        return {"reps": self.reps, "settings": self.settings, "summary": self.summary,
                "stats": {label: self.stats(label) for label in self.labels()},
                "records": self.records}


def spread(values: Iterable[float]) -> dict[str, Any]:
    """Median, min and max of the finite values (an unfinished drain gives NaN)."""
    found = [value for value in values if math.isfinite(value)]
    if not found:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(found), "min": min(found), "max": max(found),
            "n": len(found), "values": found}


def summarised(found: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per label, the spread of each figure over its runs (for the tools outside
    `python -m bench` that keep one dict of figures per run)."""
    return {label: {key: spread(run[key] for run in runs) for key in runs[0]}
            for label, runs in found.items()}


@dataclass(frozen=True)
class Case:
    """One thing measured in every repetition: its label, how, and its settings."""

    label: str
    measure: Callable[[], Figure]
    settings: dict[str, Any] = field(default_factory=dict)


def interleave(run: Run, cases: Sequence[Case]) -> None:
    """Each repetition measures every case once; every other repetition in reverse order
    (A B C, C B A, A B C, ...), so that no case always runs in the same place in the
    sequence. Place mattered here: in two series of A/B node drains (8 pairs each, the
    order alternating), the second drain of a pair was the faster in 14 of 16, by about
    10 %, whichever system it was. With the same order in every repetition, the first
    case (orch8's defaults) would always have paid that."""
    for rep in range(run.reps):
        for case in (cases if rep % 2 == 0 else cases[::-1]):
            figure = case.measure()
            run.add(case.label, rep, figure.per_s, **case.settings, **figure.as_json())
