"""`nodes`: the same drain by 1, 2 and 3 supervisors on one database (one worker each, so
N nodes are N worker processes), interleaved; scaling is taken within each repetition."""

from __future__ import annotations

from typing import Any

from bench.cases import Context, orch8_case
from bench.engine import NodeSettings
from bench.runs import Run, interleave

COUNTS = (1, 2, 3)


def _label(nodes: int) -> str:
    return f"{nodes} node{'s' if nodes > 1 else ''}, 1 worker each"


def measure(context: Context) -> Run:
    count = context.size(5_000, 1_000)
    counts = (1, 2) if context.quick else COUNTS
    run = Run("nodes", context.reps, settings={"instances": count})
    interleave(run, [orch8_case(context, NodeSettings(workers=1), count, _label(n), nodes=n)
                     for n in counts])
    run.summary = {f"nodes_{n}_per_s": run.stats(_label(n))["median"] for n in counts}
    run.summary.update({f"scaling_{n}_vs_1": run.ratio(_label(n), _label(1))["median"]
                        for n in counts[1:]})
    return run


def plot(run: Run) -> list[tuple[str, Any]]:
    return []
