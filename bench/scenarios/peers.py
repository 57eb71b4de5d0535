"""`peers`: pgqueuer (asyncpg, drain mode; batch 100 and 1000; 1 and 2 consumers) beside
orch8 with its defaults and 2 workers, interleaved, plus pgqueuer's enqueue rate."""

from __future__ import annotations

from typing import Any

from bench import peer
from bench.cases import Context, orch8_case, pgqueuer_case
from bench.engine import NodeSettings
from bench.runs import Case, Figure, Run, interleave

ORCH8_LABEL = "orch8 defaults, 2 workers"
ENQUEUE_LABEL = "pgqueuer enqueue (lists of 1000)"


def measure(context: Context) -> Run:
    count = context.size(5_000, 1_000)
    shapes = ((1000, 2), (100, 1)) if context.quick else ((100, 1), (100, 2), (1000, 1),
                                                            (1000, 2))
    run = Run("peers", context.reps, settings={"instances": count})
    cases = [orch8_case(context, NodeSettings(workers=2), count, ORCH8_LABEL)]
    cases += [pgqueuer_case(context, batch, consumers, count) for batch, consumers in shapes]

    def enqueue() -> Figure:
        with context.server.database(migrated=False) as dsn:
            peer.install(dsn)
            return peer.enqueue(dsn, count)

    cases.append(Case(ENQUEUE_LABEL, enqueue, {"system": "pgqueuer"}))
    interleave(run, cases)
    run.summary = {"engine_per_s": run.stats(ORCH8_LABEL)["median"],
                   "pgqueuer_enqueue_per_s": run.stats(ENQUEUE_LABEL)["median"]}
    for case in cases[1:-1]:
        key = f"batch_{case.settings['batch_size']}_{case.settings['workers']}_consumers"
        run.summary[f"pgqueuer_{key}_per_s"] = run.stats(case.label)["median"]
        run.summary[f"ratio_pgqueuer_{key}"] = run.ratio(ORCH8_LABEL, case.label)["median"]
    return run


def plot(run: Run) -> list[tuple[str, Any]]:
    return []
