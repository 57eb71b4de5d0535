"""What one claim-and-finish costs PostgreSQL, per instance, on orch8's schema and on others.

    .venv/bin/python bench/sql_floor.py [--instances 20000] [--runs 5] [--case NAME ...]

One connection claims 50 due one-step instances and finishes them, until none is left:
no engine, no second process, so the backend's own CPU counter (read through psutil:
PostgreSQL must run on this machine) is the statements' cost alone, and the machine's
drift touches every case alike because they alternate within each run. The cases:

- `raw loop`: the minimal raw loop's table and statements (`bench/raw.py`).
- `orch8`: orch8's claim (`claims.CLAIM_PLAIN`) and fenced finish (`claims.FINISH_STEPS`).
- `orch8, finish and claim at once`: what a worker sends while a backlog lasts, one
  statement that finishes a batch and claims the next (`claims.FINISH_AND_CLAIM`).
- `orch8, planned afresh each call`: the same, with PostgreSQL made to plan each call
  again (`plan_cache_mode = force_custom_plan`): what planning costs. The claim was planned
  so whenever the statistics knew a backlog, until it was given a literal bound.
- `orch8 table, minimal statements`: orch8's table, but a claim shaped like the raw loop's
  and a finish that only sets `state`: what the table costs by itself.
- `… no keyed trigger, no running index`: the same, with those two dropped.
- `narrow claim table` (and `…, joined for input`): the claim's columns in a table of
  their own, finished like orch8, with or without the join back to `instances` that a
  worker needs for each instance's input and definition.

They answer "how close to the raw loop can orch8's SQL get": its table and the
statements the engine needs, against the other shapes a redesign could take. Prints, per
case, the backend's CPU, the client's CPU and the WAL per instance (medians of the runs,
min–max) and the backend CPU as a ratio to the raw loop's within each run; the last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import engine, raw  # noqa: E402
from bench.runs import summarised  # noqa: E402
from bench.server import DATA_DIR, Server  # noqa: E402
from orch8.store import claims  # noqa: E402
from orch8.store.claims import Owner, StepDone  # noqa: E402

BATCH = 50
OWNER = Owner("sql-floor", uuid.uuid4(), 0)
# uuidv7() (PostgreSQL 18) as orch8's client makes them: time-ordered, as the primary key
# sees them in production. Random (v4) keys cost the index noticeably more.
BACKLOG = """
INSERT INTO instances (id, sequence_name, sequence_version)
SELECT {id}, %(sequence)s, 1 FROM generate_series(1, %(count)s)
"""

RAW_SHAPED_CLAIM = """
UPDATE instances SET state = 'running'
WHERE id IN (SELECT id FROM instances
             WHERE state = 'scheduled' AND NOT waiting_for_slot AND next_fire_at <= now()
               AND priority = ANY ('{3,2,1,0}'::smallint[])
             ORDER BY priority DESC, next_fire_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, claim_epoch
"""
STATE_ONLY_FINISH = """
WITH done AS (SELECT (d->>0)::uuid AS id FROM jsonb_array_elements(%(batch)s::jsonb) AS d),
advanced AS (
    UPDATE instances i SET state = 'completed' FROM done d
    WHERE i.id = ANY (ARRAY(SELECT id FROM done)) AND i.id = d.id
)
SELECT 1 WHERE false
"""
NO_TRIGGER_NO_RUNNING_INDEX = """
DROP TRIGGER instances_keyed_state_change ON instances;
DROP INDEX instances_running_by_incarnation
"""

# The columns a claim or a finish writes (and those the claim orders by), apart from the
# instance's data and keys: what a claim table of its own would hold.
NARROW_TABLE = """
CREATE TABLE claim_rows (
    id uuid PRIMARY KEY, state text NOT NULL DEFAULT 'scheduled',
    priority smallint NOT NULL, next_fire_at timestamptz NOT NULL,
    step_index int NOT NULL DEFAULT 0, attempt int NOT NULL DEFAULT 0,
    delay_done boolean NOT NULL DEFAULT false, claimed_by text, claim_incarnation uuid,
    claimed_slot int, claim_epoch bigint NOT NULL DEFAULT 0, claimed_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz);
CREATE INDEX claim_rows_order ON claim_rows (priority DESC, next_fire_at)
    WHERE state = 'scheduled';
CREATE INDEX claim_rows_running ON claim_rows (claim_incarnation, claimed_slot)
    WHERE state = 'running';
INSERT INTO claim_rows (id, priority, next_fire_at)
    SELECT id, priority, next_fire_at FROM instances;
UPDATE instances SET state = 'running'
"""
# orch8's claim (what it sets) and fenced finish, on that table.
NARROW_TAKE = f"""
UPDATE claim_rows i {claims.TAKE}
WHERE id IN (SELECT id FROM claim_rows
             WHERE state = 'scheduled' AND next_fire_at <= now()
               AND priority = ANY ('{{3,2,1,0}}'::smallint[])
             ORDER BY priority DESC, next_fire_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING i.id, i.claim_epoch, i.step_index, i.attempt, i.priority, i.next_fire_at
"""
NARROW_CLAIM_JOINED = f"""
WITH taken AS ({NARROW_TAKE})
SELECT t.id, t.claim_epoch, i.sequence_name, i.sequence_version, i.input, t.step_index,
    t.attempt, t.priority, extract(epoch FROM now() - t.next_fire_at)::float8
FROM taken t JOIN instances i ON i.id = t.id
"""
NARROW_FINISH = claims.FINISH_STEPS.replace("UPDATE instances i", "UPDATE claim_rows i")


@dataclass(frozen=True)
class Case:
    setup: str
    claim: str
    finish: str
    finish_params: Callable[[list[StepDone]], dict[str, Any]] = claims.finish_params
    # Each finish also claims the next batch (`finish` is then that statement).
    claims_with_finish: bool = False


CASES: dict[str, Case | None] = {
    "raw loop": None,
    "orch8": Case("", claims.bounded(claims.CLAIM_PLAIN, BATCH), claims.FINISH_STEPS),
    "orch8, finish and claim at once": Case(
        "", claims.bounded(claims.CLAIM_PLAIN, BATCH),
        claims.bounded(claims.FINISH_AND_CLAIM, BATCH), claims_with_finish=True),
    "orch8, planned afresh each call": Case(
        "SET plan_cache_mode = force_custom_plan", claims.bounded(claims.CLAIM_PLAIN, BATCH),
        claims.FINISH_STEPS),
    "orch8 table, minimal statements": Case("", RAW_SHAPED_CLAIM, STATE_ONLY_FINISH),
    "… no keyed trigger, no running index": Case(
        NO_TRIGGER_NO_RUNNING_INDEX, RAW_SHAPED_CLAIM, STATE_ONLY_FINISH),
    "narrow claim table": Case(NARROW_TABLE, NARROW_TAKE, NARROW_FINISH),
    "narrow claim table, joined for input": Case(
        NARROW_TABLE, NARROW_CLAIM_JOINED, NARROW_FINISH),
}


def measured(conn: psycopg.Connection[Any], count: int,
             loop: Callable[[], int]) -> dict[str, float]:
    """Run `loop` (claim and finish until empty; it returns how many it finished) and
    read what it cost the backend, the client and the WAL."""
    backend = psutil.Process(conn.info.backend_pid)
    lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
    server, client, wall = backend.cpu_times(), time.process_time(), time.perf_counter()
    finished = loop()
    after = backend.cpu_times()
    client, wall = time.process_time() - client, time.perf_counter() - wall
    row = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn,)).fetchone()
    if finished != count:
        raise SystemExit(f"sql_floor: {finished} of {count} instances finished")
    spent = after.user + after.system - server.user - server.system
    return {"postgres_us": spent * 1e6 / count, "client_us": client * 1e6 / count,
            "wal_bytes": float(row[0]) / count if row else float("nan"),  # type: ignore[index]
            "per_s": count / wall}


def raw_case(dsn: str, count: int) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(raw.SCHEMA)
        conn.execute(raw.BACKLOG, {"count": count})
        conn.execute("VACUUM ANALYZE raw_jobs")

        def loop() -> int:
            finished = 0
            while rows := conn.execute(raw.CLAIM, {"batch": BATCH}).fetchall():
                conn.execute(raw.FINISH, {"ids": [row[0] for row in rows]})
                finished += len(rows)
            return finished

        return measured(conn, count, loop)


def orch8_case(dsn: str, count: int, case: Case) -> dict[str, float]:
    sequence = engine.new_sequence(dsn)
    step = engine.NOOP[0]["id"]
    params = claims.claim_params(OWNER, BATCH)
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.info.server_version
        ids = "uuidv7()" if version >= 180000 else "gen_random_uuid()"
        conn.execute(BACKLOG.format(id=ids), {"sequence": sequence, "count": count})
        for statement in filter(str.strip, case.setup.split(";")):
            conn.execute(statement)
        conn.execute("VACUUM ANALYZE")

        def loop() -> int:
            finished = 0
            rows = conn.execute(case.claim, params).fetchall()
            while True:
                done = [StepDone(row[0], row[1], step, 1, "{}", 1, True)
                        for row in rows if row[0] is not None]
                if not done:
                    return finished
                if case.claims_with_finish:
                    rows = conn.execute(case.finish,
                                        params | case.finish_params(done)).fetchall()
                else:
                    conn.execute(case.finish, case.finish_params(done)).fetchall()
                    rows = conn.execute(case.claim, params).fetchall()
                finished += len(done)

        return measured(conn, count, loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--case", action="append", choices=list(CASES),
                        help="only these cases (the raw loop always runs)")
    args = parser.parse_args()
    names = ["raw loop", *[name for name in CASES if name != "raw loop"
                           and (not args.case or name in args.case)]]
    server = Server.open(DATA_DIR)
    found: dict[str, list[dict[str, float]]] = {}
    try:
        for run in range(args.runs):
            raw_figures: dict[str, float] = {}
            for name in names:  # the raw loop first: the ratios are to its figure of this run
                case = CASES[name]
                with server.database(migrated=case is not None) as dsn:
                    figures = (raw_case(dsn, args.instances) if case is None
                               else orch8_case(dsn, args.instances, case))
                raw_figures = raw_figures or figures
                figures["postgres_vs_raw"] = figures["postgres_us"] / raw_figures["postgres_us"]
                found.setdefault(name, []).append(figures)
                print(f"run {run + 1}: {name}: PostgreSQL {figures['postgres_us']:.1f} µs, "
                      f"client {figures['client_us']:.1f} µs, WAL {figures['wal_bytes']:.0f} B "
                      f"per instance; {figures['postgres_vs_raw']:.2f}× the raw loop's "
                      "PostgreSQL CPU", flush=True)
    finally:
        server.close()
    print(orjson.dumps(summarised(found)).decode())


if __name__ == "__main__":
    main()
