"""`scale`: the same drain with 10^6 other rows in the table, beside an empty table, each
kind on a database of its own and taking turns within every repetition:

- `history`: completed instances with their step outputs;
- `future`: scheduled a day ahead at the drained rows' priority (normal);
- `future, higher priority`: the same at high priority, so they come first in the
  claim order although none of them is due;
- `churned`: rows that were due and were completed after their insert, left as dead
  tuples with autovacuum off on that database (no fresh VACUUM);
- `running elsewhere`: 10^4 instances (a hundredth of the others) running under another
  live node, so the finish and the claim must not grow with the cluster's load.

The 10^6 rows are written by SQL (`INSERT … SELECT`): through the client they would take
minutes. The drained backlog itself goes through the client like everywhere else; the
ratio to the empty table is taken within each repetition.
"""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from typing import Any

import psycopg

from bench import engine
from bench.cases import Context
from bench.engine import NodeSettings
from bench.plots import pyplot
from bench.runs import Case, Figure, Run, interleave

EMPTY = "empty table"
ROWS = """
INSERT INTO instances (id, sequence_name, sequence_version, state, priority, next_fire_at,
                       step_index, finished_at)
SELECT gen_random_uuid(), %(sequence)s, 1, %(state)s, %(priority)s,
       now() + %(fire_in)s * interval '1 second' + g * interval '1 ms',
       CASE WHEN %(state)s = 'completed' THEN 1 ELSE 0 END,
       CASE WHEN %(state)s = 'completed' THEN now() END
FROM generate_series(1, %(rows)s) AS g
"""
OUTPUTS = """
INSERT INTO step_outputs (instance_id, step_id, output, attempt)
SELECT id, 'only', '{}', 1 FROM instances WHERE sequence_name = %(sequence)s
"""
COMPLETE = """
UPDATE instances SET state = 'completed', step_index = 1, finished_at = now()
WHERE sequence_name = %(sequence)s
"""
HIGH = 2
DAY_S = 24 * 3600
# A node whose heartbeat stays fresh for the whole run, so no sweep gives its claims back.
STAND_IN_NODE = """
INSERT INTO cluster_nodes (id, incarnation, hostname, pid, workers, last_heartbeat)
VALUES (%(node)s, %(incarnation)s, 'elsewhere', 0, 1, now() + interval '1 day')
"""
RUNNING = """
INSERT INTO instances (id, sequence_name, sequence_version, state, claimed_by,
                       claim_incarnation, claimed_slot, claim_epoch, claimed_at)
SELECT gen_random_uuid(), %(sequence)s, 1, 'running', %(node)s, %(incarnation)s, 0, 1,
       now()
FROM generate_series(1, %(rows)s)
"""


def _history(conn: psycopg.Connection[Any], sequence: str, rows: int) -> None:
    conn.execute(ROWS, _rows(sequence, rows, "completed", fire_in=-DAY_S))
    conn.execute(OUTPUTS, {"sequence": sequence})


def _future(conn: psycopg.Connection[Any], sequence: str, rows: int,
            priority: int = engine.NORMAL) -> None:
    conn.execute(ROWS, _rows(sequence, rows, "scheduled", fire_in=DAY_S, priority=priority))


def _future_high(conn: psycopg.Connection[Any], sequence: str, rows: int) -> None:
    _future(conn, sequence, rows, HIGH)


def _churned(conn: psycopg.Connection[Any], sequence: str, rows: int) -> None:
    conn.execute("ALTER TABLE instances SET (autovacuum_enabled = off)")
    conn.execute(ROWS, _rows(sequence, rows, "scheduled", fire_in=-3600))
    conn.execute(COMPLETE, {"sequence": sequence})


def _running_elsewhere(conn: psycopg.Connection[Any], sequence: str, rows: int) -> None:
    incarnation = uuid.uuid4()
    conn.execute(STAND_IN_NODE, {"node": engine.ELSEWHERE, "incarnation": incarnation})
    conn.execute(RUNNING, {"sequence": sequence, "rows": max(1, rows // 100),
                           "node": engine.ELSEWHERE, "incarnation": incarnation})


def _rows(sequence: str, rows: int, state: str, fire_in: int,
          priority: int = engine.NORMAL) -> dict[str, Any]:
    return {"sequence": sequence, "rows": rows, "state": state, "fire_in": fire_in,
            "priority": priority}


KINDS = {"history": _history, "future": _future, "future, higher priority": _future_high,
         "churned": _churned, "running elsewhere": _running_elsewhere}


def measure(context: Context) -> Run:
    rows, count = context.size(1_000_000, 20_000), context.size(5_000, 1_000)
    run = Run("scale", context.reps, settings={"rows": rows, "instances": count})
    with ExitStack() as stack:
        cases = [_case(stack.enter_context(context.server.database()), EMPTY, count)]
        for kind, fill in KINDS.items():
            dsn = stack.enter_context(context.server.database())
            sequence = engine.new_sequence(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                fill(conn, sequence, rows)
            cases.append(_case(dsn, kind, count))
        interleave(run, cases)
    run.summary = {"empty_per_s": run.stats(EMPTY)["median"]}
    for kind in KINDS:
        key = kind.replace(", ", "_").replace(" ", "_")
        run.summary[f"{key}_per_s"] = run.stats(kind)["median"]
        run.summary[f"ratio_{key}"] = run.ratio(kind, EMPTY)["median"]
    return run


def _case(dsn: str, kind: str, count: int) -> Case:
    def measure_one() -> Figure:
        return engine.drain(dsn, NodeSettings(workers=2), count)

    return Case(kind, measure_one, {"system": "orch8", "background": kind})


def plot(run: Run) -> list[tuple[str, Any]]:
    """Each background's drain rate as a share of the empty table's, per repetition."""
    figure, axes = pyplot.subplots(figsize=(7, 4))
    kinds = list(KINDS)
    for rep in range(run.reps):
        values = {r["label"]: r["value"] for r in run.records if r["rep"] == rep}
        if values.get(EMPTY):
            axes.plot(kinds, [values.get(kind, float("nan")) / values[EMPTY] for kind in kinds],
                      marker="o", linestyle="none", label=f"repetition {rep + 1}")
    axes.axhline(1.0, color="grey", linestyle="--")
    axes.set_ylabel("drain rate / empty table's (same repetition)")
    axes.set_title(f"Drain with {run.settings['rows']:,} other rows present")
    axes.legend(fontsize=7)
    return [("scale", figure)]
