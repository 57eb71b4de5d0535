"""The worker's side of `instances`: the claim, and every write made under a claim.

Every write after the claim names the `claim_epoch` it was claimed with and applies only
while the row is still `running` under that epoch. "Not applied" means the claim was lost
(a stale-node sweep, a worker release or a cancel bumped the epoch): the caller logs and
drops the write. That guard is what applies a step's outcome exactly once even when its
handler ran twice.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson
import psycopg
from psycopg.rows import dict_row

from orch8.store import sequences, wire


class Claimed(NamedTuple):
    """A claimed instance: what the executor needs to run its steps.

    Immutable like the other rows here, but a named tuple rather than a frozen dataclass:
    one is built per claimed instance on the hot path, and a frozen dataclass's `__init__`
    (one `object.__setattr__` per field) costs four times as much. The hot path builds it
    (and `StepContext`, `Outcome`) with `tuple.__new__(Claimed, fields)`: a named tuple's
    own constructor is a Python function around that call, which costs as much again
    (390 against 210 ns here, on the development machine).
    """

    id: uuid.UUID
    epoch: int
    sequence_name: str
    sequence_version: int
    input: dict[str, Any]
    step_index: int
    attempt: int
    delay_done: bool
    # A `Priority`'s value (the column as it is stored; compared, never shown).
    priority: int
    # Seconds from when it was due to when it was claimed (the claim-latency metric).
    # Read with `date_part`, a float8 already: `extract` gives a numeric, whose arithmetic
    # and cast made a held lock of 100 rows 8 % dearer (interleaved A/B on one connection).
    lateness_s: float
    # It has a concurrency key (a held claim leaves it to the keyed claim: `lock_due`).
    keyed: bool
    # Where a held claim found its row (`ctid`), for the write in the same transaction
    # (`SETTLE_LOCKED`); None for a claim that set the row `running` (a held claim's too,
    # once committed).
    ctid: str | None


@dataclass(frozen=True)
class Owner:
    """Who claims: a node's current incarnation and one worker slot in it."""

    node_id: str
    incarnation: uuid.UUID
    slot: int


# The claim. Unkeyed due instances are taken as they come, in index order. A keyed one
# also needs a free slot of its key (`concurrency_slots`, migration 002): the n-th
# candidate of a key in this batch takes the key's n-th free slot, if its own
# max_concurrency allows that slot number. Candidates a full key cannot seat are parked
# (`waiting_for_slot`): they leave the claim index, so a saturated key neither fills
# later batches (no head-of-line blocking) nor is re-read every tick (no spinning), and
# the trigger that frees one of its slots wakes the next of them.
#
# Parking is safe only if no slot of the key can be freed unseen, so it requires that
# this statement holds every slot row of the key locked: a finishing instance must then
# wait for this claim to commit before it frees its slot, and its wake-up sees the parked
# rows. A key with a slot row locked elsewhere is not parked this time (tried next claim).
# Nothing here waits on instances: their rows and slot rows are all taken with SKIP LOCKED.
#
# The candidates are read from `instances_claim_order` in its order. `priority = ANY
# (every priority)` is always true (the column's CHECK) but lets the index find the due
# rows of each priority with one bounded search: without it, `next_fire_at <= now()` is a
# condition on the index's second column, and servers before PostgreSQL 18 (no skip scan)
# walk every row scheduled for later, of every priority, on every claim that finds fewer
# due rows than its batch. Migration 003 leaves this index the only one that can serve
# `state = 'scheduled'`, so the plan holds when the statistics say the table is empty.
#
# `replaced` (see CLAIMER_REPLACED) is the one wait: on a registration of this node id in
# flight. It stops an incarnation that is no longer the registered one from claiming.
CLAIMER_REPLACED = """
claimer AS MATERIALIZED (
    -- KEY SHARE on our node row, whatever it holds: a registration that takes the id
    -- over (FOR UPDATE of the row, orch8.store.nodes) waits for this claim to commit, or
    -- this claim waits for it and then reads the row as it committed it. Heartbeats and
    -- sweeps do not conflict with it. A node id with no row at all (a worker run without
    -- a supervisor) is not checked.
    SELECT incarnation, state FROM cluster_nodes WHERE id = %(node_id)s FOR KEY SHARE
), replaced AS (
    SELECT 1 FROM claimer WHERE incarnation <> %(incarnation)s OR state = 'dead'
)"""
#
# The due rows, shared by every claim statement: the one place that says which due
# instances a claim may take, and in what order.
DUE = """
    FROM instances
    WHERE state = 'scheduled' AND NOT waiting_for_slot AND next_fire_at <= now()
      AND NOT EXISTS (SELECT 1 FROM replaced)
      AND priority = ANY ('{3,2,1,0}'::smallint[])
    ORDER BY priority DESC, next_fire_at
    LIMIT %(limit)s
    -- SKIP LOCKED: never wait on a row another worker is claiming; take the next one.
    FOR UPDATE SKIP LOCKED
"""
CANDIDATES = f"""
    SELECT id, concurrency_key AS key, coalesce(max_concurrency, 1) AS cap, priority,
        next_fire_at {DUE}"""
#
# The candidates again, under a literal bound (`{bound}`, see `bounded`): the statements
# read them through this. The exact limit is a parameter, so that one prepared statement
# serves every limit; but a generic plan cannot see a parameter's value and assumes a
# tenth of the due rows, which made PostgreSQL judge it dearer than a plan for the value
# at hand and plan every claim afresh (a tenth of the server's CPU in a drain), or, made
# generic, update through a scan of the whole table. The bound, a power of two at or
# above the limit, gives both plans nearly the same estimate, and the claimed rows are
# updated through one array of their ids (not a join to the candidates), whose estimate
# does not grow with the batch: the generic plan costs what a fresh one does, and
# PostgreSQL keeps it. (A join that also tested the array made PostgreSQL re-sort the
# array for every candidate.)
BOUNDED_CANDIDATES = f"SELECT * FROM ({CANDIDATES}) due LIMIT {{bound}}"

# What a claim sets and returns, the same in both statements.
TAKE = """
    SET state = 'running', claimed_by = %(node_id)s, claim_incarnation = %(incarnation)s,
        claimed_slot = %(slot)s, claimed_at = now(), claim_epoch = i.claim_epoch + 1,
        updated_at = now()
"""
TAKEN = """
    RETURNING i.id, i.claim_epoch AS epoch, i.sequence_name, i.sequence_version, i.input,
        i.step_index, i.attempt, i.delay_done, i.priority,
        date_part('epoch', now() - i.next_fire_at) AS lateness_s,
        i.concurrency_key IS NOT NULL AS keyed, NULL::text AS ctid
"""

CLAIM = f"""
WITH {CLAIMER_REPLACED}, candidate AS MATERIALIZED ({BOUNDED_CANDIDATES}), slot AS MATERIALIZED (
    -- Locked rows come back as their latest committed version, whatever the snapshot.
    -- SKIP LOCKED: a slot another claim or a finishing instance holds is left alone.
    SELECT concurrency_key AS key, slot, instance_id
    FROM concurrency_slots
    WHERE concurrency_key = ANY (ARRAY(
        SELECT DISTINCT key FROM candidate WHERE key IS NOT NULL))
    FOR UPDATE SKIP LOCKED
), keyed AS (
    SELECT id, key, cap,
        row_number() OVER (PARTITION BY key ORDER BY priority DESC, next_fire_at, id) AS rank
    FROM candidate WHERE key IS NOT NULL
), free AS (
    SELECT key, slot, row_number() OVER (PARTITION BY key ORDER BY slot) AS rank
    FROM slot WHERE instance_id IS NULL
), seated AS (
    SELECT k.id, k.key, f.slot
    FROM keyed k JOIN free f ON f.key = k.key AND f.rank = k.rank AND f.slot <= k.cap
), whole AS (
    -- Keys whose every slot row this statement holds locked.
    SELECT key FROM slot GROUP BY key
    HAVING count(*) = (
        SELECT count(*) FROM concurrency_slots a WHERE a.concurrency_key = slot.key)
), parked AS (
    SELECT k.id FROM keyed k
    WHERE k.key IN (SELECT key FROM whole)
      AND NOT EXISTS (SELECT 1 FROM seated s WHERE s.id = k.id)
      AND NOT EXISTS (
          SELECT 1 FROM free f
          WHERE f.key = k.key AND f.slot <= k.cap
            AND NOT EXISTS (SELECT 1 FROM seated s WHERE s.key = f.key AND s.slot = f.slot))
), backlog AS (
    -- A key proven full parks its other due instances as well (a bounded number per
    -- claim), found through the key's own index instead of batch after batch here.
    SELECT b.id
    FROM (SELECT DISTINCT k.key FROM keyed k JOIN parked p ON p.id = k.id) full_key
    CROSS JOIN LATERAL (
        SELECT id FROM instances
        WHERE concurrency_key = full_key.key AND state = 'scheduled'
          AND NOT waiting_for_slot AND next_fire_at <= now()
          AND id NOT IN (SELECT id FROM candidate)
        LIMIT 1000
        FOR UPDATE SKIP LOCKED
    ) b
), taken AS (
    UPDATE concurrency_slots s SET instance_id = seated.id
    FROM seated
    WHERE s.concurrency_key = seated.key AND s.slot = seated.slot
), parking AS (
    UPDATE instances i SET waiting_for_slot = true, updated_at = now()
    FROM (SELECT id FROM parked UNION ALL SELECT id FROM backlog) p
    WHERE i.id = p.id
    RETURNING i.id
), chosen AS (
    SELECT id FROM candidate WHERE key IS NULL UNION ALL SELECT id FROM seated
), claimed AS (
    UPDATE instances i {TAKE}
    WHERE i.id = ANY (ARRAY(SELECT id FROM chosen)) {TAKEN}
)
SELECT claimed.*, parked.count AS parked
FROM (SELECT count(*) FROM parking) AS parked LEFT JOIN claimed ON true
"""

# The common case, without the slot machinery: take the candidates that have no
# concurrency key, and say how many have one. Those stay where they are (their row locks
# end with this statement) for `CLAIM` to seat or park straight after.
CLAIM_PLAIN = f"""
WITH {CLAIMER_REPLACED}, candidate AS MATERIALIZED ({BOUNDED_CANDIDATES}), claimed AS (
    UPDATE instances i {TAKE}
    WHERE i.id = ANY (ARRAY(SELECT id FROM candidate WHERE key IS NULL)) {TAKEN}
)
SELECT claimed.*, keyed.count AS keyed
FROM (SELECT count(*) FROM candidate WHERE key IS NOT NULL) AS keyed LEFT JOIN claimed ON true
"""

# Rows parked by a claim took room in its batch without being started: claim again at
# once for the rest (a few rounds at most), so meeting a saturated key costs no tick.
CLAIM_ROUNDS = 4


async def claim(conn: psycopg.AsyncConnection[Any], owner: Owner, limit: int) -> list[Claimed]:
    """Claim up to `limit` due instances, highest priority first, then oldest due.

    Keyed instances are claimed only into a free slot of their key; those that find the
    key full are parked until a slot frees (see `CLAIM`). Only when the candidates hold a
    keyed one does the claim pay for that machinery.
    """
    claimed, keyed = await _claim_plain(conn, owner, limit)
    if keyed:
        claimed += await claim_keyed(conn, owner, limit - len(claimed))
    return most_urgent_first(claimed)


def most_urgent_first(claimed: list[Claimed]) -> list[Claimed]:
    """RETURNING does not keep the scan's order; start the most urgent first."""
    claimed.sort(key=lambda c: (-c.priority, -c.lateness_s))
    return claimed


async def _claim_plain(
    conn: psycopg.AsyncConnection[Any], owner: Owner, limit: int
) -> tuple[list[Claimed], int]:
    cursor = await conn.execute(bounded(CLAIM_PLAIN, limit), claim_params(owner, limit))
    rows = await cursor.fetchall()
    keyed = int(rows[0][-1]) if rows else 0
    return _claims_in(rows), keyed


async def claim_keyed(
    conn: psycopg.AsyncConnection[Any], owner: Owner, limit: int
) -> list[Claimed]:
    """Claim due instances, keyed ones seated or parked (`CLAIM`), in a few rounds."""
    claimed: list[Claimed] = []
    for _ in range(CLAIM_ROUNDS):
        taken, parked = await _claim_round(conn, owner, limit - len(claimed))
        claimed += taken
        if not parked or len(claimed) >= limit:
            break
    return claimed


async def _claim_round(
    conn: psycopg.AsyncConnection[Any], owner: Owner, limit: int
) -> tuple[list[Claimed], int]:
    cursor = await conn.execute(bounded(CLAIM, limit), claim_params(owner, limit))
    rows = await cursor.fetchall()
    parked = int(rows[0][-1]) if rows else 0
    return _claims_in(rows), parked


def _claims_in(rows: list[tuple[Any, ...]]) -> list[Claimed]:
    """The claimed rows of a claim statement's answer: its trailing counts are LEFT JOINed
    to what it claimed, so a claim that took nothing answers one row of NULLs."""
    return [_claimed(row) for row in rows if row[0] is not None]


# A row of `Claimed`'s columns, in its order, as a `Claimed` (the named tuple's own
# constructor without its Python wrapper). `LOCK_DUE`'s rows are exactly those columns, so
# psycopg calls it straight on the values it loaded: no Python call per row (a third of a
# µs per instance here).
_CLAIMED_ROW = functools.partial(tuple.__new__, Claimed)
_CLAIMED_COLUMNS = len(Claimed._fields)


def _claimed(row: tuple[Any, ...]) -> Claimed:
    """A row of `TAKEN` (plus a trailing count), in its column order."""
    return _CLAIMED_ROW(row[:_CLAIMED_COLUMNS])


def bounded(statement: str, limit: int) -> str:
    """A claim statement as sent for a claim of up to `limit`: a few texts in all
    (one per power of two), each prepared once per connection."""
    return _with_bound(statement, _bound(limit))


def _bound(limit: int) -> int:
    return 1 << max(limit - 1, 0).bit_length()


@functools.cache
def _with_bound(statement: str, bound: int) -> str:
    return statement.replace("{bound}", str(bound))


def claim_params(owner: Owner, limit: int) -> dict[str, Any]:
    """The claim's parameters (in `CLAIM`, `CLAIM_PLAIN` and `FINISH_AND_CLAIM`)."""
    return {"node_id": owner.node_id, "incarnation": owner.incarnation, "slot": owner.slot,
            "limit": limit}


OUTPUTS = """
SELECT instance_id, step_id, output FROM step_outputs WHERE instance_id = ANY (%(ids)s)
"""


async def load_outputs(
    conn: psycopg.AsyncConnection[Any], instance_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """Outputs of the steps instances already finished (for claims that resume them)."""
    cursor = await conn.execute(OUTPUTS, {"ids": list(instance_ids)})
    outputs: dict[uuid.UUID, dict[str, Any]] = {}
    for instance_id, step_id, output in await cursor.fetchall():
        outputs.setdefault(instance_id, {})[step_id] = output
    return outputs


class StepDone(NamedTuple):
    """A step that succeeded: record its output and move on (or complete). A named tuple,
    like `Claimed`, for the same reason: one per step run."""

    id: uuid.UUID
    epoch: int
    step_id: str
    attempt: int
    output_json: str
    next_index: int
    last: bool


# How a step's output is recorded, by every statement that records one: a write retried
# after its reply was lost finds its own row and rewrites it (one row per step, see
# `step_outputs`'s primary key).
RECORD_OUTPUT = """
    ON CONFLICT (instance_id, step_id) DO UPDATE
        SET output = excluded.output, attempt = excluded.attempt, created_at = now()"""

# Group commit: many instances' step outcomes in one statement. The UPDATE is the fence
# (epoch and state must still match); only rows it updated get their output inserted.
# Its rows are found by their ids alone, through the primary key: the state test is
# written so that no index can serve it (`IS TRUE`), because statistics that say no row
# is running made the planner read every running row through a state index instead,
# a cost that grew with the cluster's load rather than with the batch.
# The batch travels as one JSON document: encoding it with orjson costs far less than
# adapting seven parameter arrays element by element (orjson writes UUIDs itself, too).
# Each step is an array, not an object: no key is written, parsed or looked up per field.
STEPS_DONE = """
    SELECT (d->>0)::uuid AS id, (d->>1)::bigint AS epoch, d->>2 AS step_id,
        (d->>3)::int AS attempt, d->4 AS output, (d->>5)::int AS next_index,
        (d->>6)::bool AS last
    FROM jsonb_array_elements({document}::jsonb) AS d"""
# `{gate}` is empty here; `FINISH_AND_CLAIM` fills it (see there).
FINISHED = f"""
done AS (
    {STEPS_DONE.format(document="%(batch)s")}
), advanced AS (
    UPDATE instances i
    SET step_index = d.next_index, attempt = 0, delay_done = false, updated_at = now(),
        state = CASE WHEN d.last THEN 'completed' ELSE 'running' END,
        finished_at = CASE WHEN d.last THEN now() END
    FROM done d
    -- The step index too: a write retried after its reply was lost must not apply twice.
    WHERE i.id = ANY (ARRAY(SELECT id FROM done)) AND i.id = d.id
      AND i.claim_epoch = d.epoch AND (i.state = 'running') IS TRUE
      AND i.step_index = d.next_index - 1 {{gate}}
    RETURNING i.id
), recorded AS (
    INSERT INTO step_outputs (instance_id, step_id, output, attempt)
    SELECT d.id, d.step_id, d.output, d.attempt
    FROM done d JOIN advanced a ON a.id = d.id {RECORD_OUTPUT}
)"""

FINISH_STEPS = f"""
WITH {FINISHED.replace("{gate}", "")}
-- The refused, not the applied: almost always none, so the answer costs nothing to read.
SELECT id FROM done WHERE id NOT IN (SELECT id FROM advanced)
"""


async def refused_steps(
    conn: psycopg.AsyncConnection[Any], done: Sequence[StepDone]
) -> set[uuid.UUID]:
    """Apply many step successes at once; return the ids whose fence refused them."""
    cursor = await conn.execute(FINISH_STEPS, finish_params(done))
    return {row[0] for row in await cursor.fetchall()}


def finish_params(done: Sequence[StepDone]) -> dict[str, Any]:
    """The parameter of `FINISH_STEPS`: the batch as one JSON document."""
    return {"batch": steps_json(done)}


# A step success as `STEPS_DONE` reads it, one JSON array: `StepDone`'s fields in their
# order, the output embedded as the JSON it is; writes convert their `StepDone`s
# (`step_rows`). (A held run writes less per step: `Output`.)
StepRow = tuple[uuid.UUID, int, str, int, orjson.Fragment, int, bool]


def step_rows(done: Sequence[StepDone]) -> list[StepRow]:
    """`StepDone`s as the rows a write sends."""
    return [(d.id, d.epoch, d.step_id, d.attempt, orjson.Fragment(d.output_json),
             d.next_index, d.last) for d in done]


def steps_json(done: Sequence[StepDone]) -> str:
    """Step successes as one JSON document (`FINISHED`'s, read back by `STEPS_DONE`)."""
    return orjson.dumps(step_rows(done)).decode()


# While a backlog lasts, a worker records a round's outcomes and claims its next batch in
# one statement (one round trip, one transaction) instead of two: the plain claim of
# `CLAIM_PLAIN` beside the fenced finish of `FINISH_STEPS`, each as it is alone. Two
# statements per batch cost a minimal loop of orch8's own SQL a quarter of its rate.
#
# Lock order (orch8.store.nodes): the node row before any instance row. The claim reads
# the node row FOR KEY SHARE, and a registration holding it FOR UPDATE then releases the
# old incarnation's instances; a finish that had locked some of those and then waited for
# the node row would deadlock with it. So the finish's UPDATE is gated on `replaced` (a
# one-time test, made before the UPDATE reads its first row), which also refuses nothing
# the fence would have let through: a replaced or dead incarnation's claims were released
# with their epoch bumped.
FINISH_AND_CLAIM = f"""
WITH {CLAIMER_REPLACED},
{FINISHED.replace("{gate}", "AND NOT EXISTS (SELECT 1 FROM replaced)")},
candidate AS MATERIALIZED ({BOUNDED_CANDIDATES}), claimed AS (
    UPDATE instances i {TAKE}
    WHERE i.id = ANY (ARRAY(SELECT id FROM candidate WHERE key IS NULL)) {TAKEN}
)
SELECT claimed.*, keyed.count AS keyed, refused.ids AS refused
FROM (SELECT count(*) FROM candidate WHERE key IS NOT NULL) AS keyed
CROSS JOIN (
    SELECT array_agg(id) AS ids FROM done WHERE id NOT IN (SELECT id FROM advanced)
) AS refused
LEFT JOIN claimed ON true
"""


@dataclass(frozen=True)
class Refilled:
    """What `finish_and_claim` did: the outcomes the fence refused, what it claimed, and
    how many due candidates it left for the keyed claim (`claim` takes those)."""

    refused: set[uuid.UUID]
    claimed: list[Claimed]
    keyed: int


async def finish_and_claim(conn: psycopg.AsyncConnection[Any], done: Sequence[StepDone],
                           owner: Owner, limit: int) -> Refilled:
    """Record step successes as `refused_steps` does, and claim up to `limit` due unkeyed
    instances as `claim` does, in one statement."""
    params = claim_params(owner, limit) | finish_params(done)
    cursor = await conn.execute(bounded(FINISH_AND_CLAIM, limit), params)
    rows = await cursor.fetchall()
    keyed, refused = rows[0][-2], rows[0][-1]  # always one row: the LEFT JOIN's
    return Refilled(set(refused or ()), most_urgent_first(_claims_in(rows)), int(keyed))


# The held claim: while a worker runs a batch whose steps return at once (most do: `noop`,
# a handler that only computes), the batch needs no `running` state at all. The worker
# locks its due rows in a transaction (LOCK_DUE), runs their steps in memory, and in the
# same transaction writes each one's outcome (SETTLE_LOCKED): completed, with its
# outputs, or claimed at the step where it stopped to wait (a coroutine that suspended, a
# plain function for a thread, a delay, a rate limit, a failure), to go on under that
# claim like any other. An instance is then written once instead of twice (a claim and a
# finish), with one index entry fewer (the running index), which is most of what the
# database spends on a one-step instance.
#
# The row lock is the claim while it lasts: no other claim takes a locked row (SKIP
# LOCKED), and every other writer waits for this transaction. If the worker dies, its
# transaction ends with its connection and nothing of it was written; a stale-node sweep
# ends the sessions of a node it declares dead (orch8.store.nodes), and a dead worker's
# interrupted step is charged an attempt whether it was claimed or held (LOCK_HELD).
# Keyed candidates are locked too, and counted, for `claim_keyed` after the commit.
LOCK_DUE = f"""
WITH {CLAIMER_REPLACED}
SELECT * FROM (
    SELECT id, claim_epoch AS epoch, sequence_name, sequence_version, input, step_index,
        attempt, delay_done, priority,
        date_part('epoch', now() - next_fire_at) AS lateness_s,
        concurrency_key IS NOT NULL AS keyed, ctid {DUE}
) due LIMIT {{bound}}
"""


# A held claim's transaction runs its statements on the plan PostgreSQL makes for any
# values (a generic plan), from their first run. Left to choose, PostgreSQL plans a
# prepared statement's first five runs for the values at hand (a new connection's first
# five batches: 0.2-0.35 ms per lock, 0.35-0.6 per write, against 0.04 and 0.15 on the
# generic plan), then compares the two: the generic plan is costed for `bound` rows (see
# `BOUNDED_CANDIDATES`), the other for the limit, so once a row costs more than PostgreSQL
# allows for planning (a large table, analyzed), it plans the lock afresh at every batch
# (with 10^6 rows of history, ten claims of ten). The plan is the same either way: the
# claim-order index read in order (`tests/test_plans.py`, under five kinds of statistics).
# `SET LOCAL` ends with the transaction: nothing else on the connection is affected.
GENERIC_PLANS = b"SET LOCAL plan_cache_mode = force_generic_plan"


def lock_due(pipeline: wire.Pipeline, owner: Owner, limit: int,
             begun: bool = False) -> wire.Sent:
    """Queue, on `pipeline`, a BEGIN (unless `begun`: a chained commit queued by
    `settle_locked` began the transaction), the transaction's generic plans
    (`GENERIC_PLANS`) and the lock of up to `limit` due instances in claim order; read it
    with `locked` once the pipeline has synced."""
    if not begun:
        pipeline.send(b"BEGIN")
    pipeline.send(GENERIC_PLANS)
    return pipeline.send(_lock_due(_bound(limit)), claim_params(owner, limit))


def locked(pipeline: wire.Pipeline, sent: wire.Sent) -> tuple[list[Claimed], int]:
    """What a synced `lock_due` locked: the unkeyed instances, and how many keyed ones
    were among them (held too, for `claim_keyed` after the commit)."""
    rows = pipeline.rows(sent, _CLAIMED_ROW)
    unkeyed = [claimed for claimed in rows if not claimed.keyed]
    return unkeyed, len(rows) - len(unkeyed)


@functools.cache
def _lock_due(bound: int) -> wire.Statement:
    """`LOCK_DUE` for claims of up to `bound` (see `bounded`), as the wire sends it."""
    return wire.Statement.of(f"lock_due_{bound}", _with_bound(LOCK_DUE, bound))


# What a held run of locked instances came to, as `SETTLE_LOCKED` reads it: plain tuples,
# each written as one JSON array (a named tuple costs 300 ns more to build, and orjson
# writes it only through a fallback call per row).
# `Settled` is where an instance's run left it, (id, epoch, next_index, last, ctid): at
# `next_index`, completed if `last`; `ctid` is its `Claimed.ctid`.
Settled = tuple[uuid.UUID, int, int, bool, str]
# `Output` is the output of a step it ran, (id, step_id, attempt, output): only what the
# row records (the write's place and fence are the instance's, in `Settled`), which made
# the write 3 % cheaper to parse and run than `StepRow`'s seven fields.
Output = tuple[uuid.UUID, str, int, orjson.Fragment]


# The held run's outcome, in the locking transaction: where each instance got to, and the
# outputs of the steps it ran. The epoch rises as at any claim, so a write made under an
# earlier claim can never land after this one. The fence (epoch, still scheduled) cannot
# refuse a row this transaction holds locked; were it ever to, that row would get no
# outputs, and the writes of its run that goes on would be refused by their own fence, as
# for any lost claim.
#
# The rows are found where the lock found them, by `ctid` (a TID scan: no index is read),
# not by id through the primary key, which cost a search of the index for every few ids
# of the batch (ids are in creation order, a batch in claim order): 4 to 6 % of the
# write (interleaved A/B on one connection). A row this transaction holds locked cannot
# be updated, deleted or moved by anyone else (VACUUM FULL and CLUSTER wait for the
# lock), so its `ctid` stays where the lock left it; and a lock that found the row updated
# since its snapshot returns the version it locked. The id is still matched, and the fence
# applied, as before.
#
# The outputs are inserted without a conflict check (no ON CONFLICT): a held run starts
# each instance at a step it has not passed; an output is only recorded by the write that
# moves its instance past that step (this one or `FINISHED`); step ids are unique in a
# sequence and a step index never goes back. So the row cannot be there, and the check
# would cost a probe of the outputs' key per step, a tenth of what the server spends on a
# one-step instance (`settle_locked` says what happens should it be there all the same).
SETTLE_LOCKED = """
WITH settled AS (
    SELECT (s->>0)::uuid AS id, (s->>1)::bigint AS epoch, (s->>2)::int AS next_index,
        (s->>3)::bool AS last, (s->>4)::tid AS ctid
    FROM jsonb_array_elements(%(settled)s::jsonb) AS s
), settling AS (
    UPDATE instances i
    SET state = CASE WHEN s.last THEN 'completed' ELSE 'running' END,
        step_index = s.next_index,
        attempt = CASE WHEN s.next_index = i.step_index THEN i.attempt ELSE 0 END,
        delay_done = s.next_index = i.step_index AND i.delay_done,
        finished_at = CASE WHEN s.last THEN statement_timestamp() END,
        claimed_by = %(node_id)s, claim_incarnation = %(incarnation)s,
        claimed_slot = %(slot)s, claimed_at = now(), claim_epoch = i.claim_epoch + 1,
        updated_at = statement_timestamp()
    FROM settled s
    WHERE i.ctid = ANY (ARRAY(SELECT ctid FROM settled)) AND i.id = s.id
      -- `IS TRUE`: found by ctid only, whatever the statistics (see `FINISHED`).
      AND i.claim_epoch = s.epoch AND (i.state = 'scheduled') IS TRUE
    RETURNING i.id
)
INSERT INTO step_outputs (instance_id, step_id, output, attempt)
SELECT (o->>0)::uuid, o->>1, o->3, (o->>2)::int
FROM jsonb_array_elements(%(outputs)s::jsonb) AS o
WHERE (o->>0)::uuid IN (SELECT id FROM settling)
"""
# The same write with the conflict check every other output write makes, for a worker
# that once found an output already there (see `settle_locked`).
SETTLE_LOCKED_CHECKED = SETTLE_LOCKED.rstrip() + RECORD_OUTPUT


_SETTLE = wire.Statement.of("settle_locked", SETTLE_LOCKED)
_SETTLE_CHECKED = wire.Statement.of("settle_locked_checked", SETTLE_LOCKED_CHECKED)


def settle_locked(pipeline: wire.Pipeline, owner: Owner, settled: Sequence[Settled],
                  outputs: Sequence[Output], checked: bool = False, chain: bool = False
                  ) -> wire.Sent:
    """Queue, on `pipeline`, the write of what the held run of locked instances came to
    (`lock_due`) and the COMMIT: they go with whatever is synced next (the next batch's
    lock, or the pipeline's end). Nothing is read back: rows this transaction holds
    locked cannot change under it. Return the COMMIT: its `ok` says it committed.

    With `chain`, the commit begins the next held claim's transaction as well (`COMMIT
    AND CHAIN`; then `lock_due(..., begun=True)`): one statement fewer per batch while a
    backlog lasts.

    Should an output be there all the same (a row written by hand, a bug), the write fails
    with `UniqueViolation` and the transaction records nothing; `checked` sends the write
    that rewrites such a row instead, as every other output write does."""
    if settled:
        pipeline.send(_SETTLE_CHECKED if checked else _SETTLE,
                      settle_params(owner, settled, outputs))
    return pipeline.send(b"COMMIT AND CHAIN" if chain else b"COMMIT")


async def warm_up(conn: psycopg.AsyncConnection[Any], limit: int) -> None:
    """Make a worker's new connection ready for held claims of up to `limit` before it
    holds a lock: prepare and run their statements (`LOCK_DUE`, `SETTLE_LOCKED`) on no
    rows, which makes their generic plans (`GENERIC_PLANS`), and run the definition
    look-up once.

    A PostgreSQL session loads the catalog entries of each table, index and function the
    first time one of its statements uses them, each statement is parsed once per
    connection, and each generic plan made once. Left to the first claim, that made its
    transaction, rows locked, last 10.1 ms instead of 5.8 (a batch of 100 on a new
    connection, medians of 12), on every new connection. Here it costs the same, once,
    before any row is locked."""
    owner = Owner("", uuid.UUID(int=0), 0)
    try:
        async with wire.Pipeline(conn) as pipeline:
            pipeline.send(b"BEGIN")
            pipeline.send(GENERIC_PLANS)
            pipeline.send(_lock_due(_bound(limit)), claim_params(owner, 0))
            pipeline.send(_SETTLE, settle_params(owner, (), ()))
            pipeline.send(b"COMMIT")
    except psycopg.Error:
        if not conn.closed:
            await conn.rollback()  # (the pool hands out only idle connections)
        raise
    await conn.execute(sequences.GET, {"name": "", "version": 0})


def settle_params(owner: Owner, settled: Sequence[Settled],
                  outputs: Sequence[Output]) -> dict[str, Any]:
    """`SETTLE_LOCKED`'s parameters: the instances and the outputs as JSON documents."""
    return claim_params(owner, len(settled)) | {
        "settled": orjson.dumps(settled).decode(), "outputs": orjson.dumps(outputs).decode()}


def rolled_back(error: BaseException) -> bool:
    """Did PostgreSQL roll the statement back whole (SQLSTATE class 40: chosen as a
    deadlock's victim, a serialization failure)? Then it applied nothing and claimed
    nothing, and sending it again is safe. Any other failed write may have committed with
    its reply lost.

    The claim's candidate scan can take part in such a deadlock: a row its snapshot still
    sees as scheduled but that another worker has claimed since is locked in its newest
    version too (PostgreSQL follows the update chain, and waits there whatever SKIP
    LOCKED says), while that worker's finish of the same row waits for this statement.
    Seen with 4 to 8 processes sending `FINISH_AND_CLAIM` at once (`bench/own_sql.py`)."""
    return isinstance(error, psycopg.Error) and (error.sqlstate or "").startswith("40")


# Whether an outcome written under this claim has already moved the instance past the step
# (its write committed, but the reply was lost to a dropped connection).
STEP_RECORDED = """
SELECT EXISTS (
    SELECT 1 FROM instances
    WHERE id = %(id)s AND claim_epoch = %(epoch)s AND step_index >= %(next_index)s
      AND state IN ('running', 'completed'))
"""


async def step_recorded(conn: psycopg.AsyncConnection[Any], done: StepDone) -> bool:
    """Did an earlier write of `done` apply? (asked only after a failed write)"""
    params = {"id": done.id, "epoch": done.epoch, "next_index": done.next_index}
    row = await (await conn.execute(STEP_RECORDED, params)).fetchone()
    return bool(row and row[0])


FENCE = "id = %(id)s AND claim_epoch = %(epoch)s AND state = 'running'"

RETRY_LATER = f"""
UPDATE instances
SET state = 'scheduled', attempt = attempt + 1, last_error = %(error)s,
    next_fire_at = now() + %(backoff_ms)s * interval '1 millisecond', updated_at = now(),
    claimed_by = NULL, claim_incarnation = NULL, claimed_slot = NULL
WHERE {FENCE}
"""

FAIL = f"""
UPDATE instances
SET state = 'failed', attempt = attempt + 1, last_error = %(error)s, finished_at = now(),
    updated_at = now()
WHERE {FENCE}
"""

# The delay is measured from the database's clock; `delay_done` says it was waited out.
WAIT = f"""
UPDATE instances
SET state = 'scheduled', delay_done = true, updated_at = now(),
    next_fire_at = now() + %(delay_ms)s * interval '1 millisecond',
    claimed_by = NULL, claim_incarnation = NULL, claimed_slot = NULL
WHERE {FENCE}
"""


async def _fenced(conn: psycopg.AsyncConnection[Any], sql: str, params: dict[str, Any]) -> bool:
    cursor = await conn.execute(sql, params)
    return cursor.rowcount == 1


async def retry_later(
    conn: psycopg.AsyncConnection[Any], claimed: Claimed, error: str, backoff_ms: int
) -> bool:
    """Count the failed attempt and schedule the next one after `backoff_ms`."""
    params = {"id": claimed.id, "epoch": claimed.epoch, "error": error, "backoff_ms": backoff_ms}
    return await _fenced(conn, RETRY_LATER, params)


async def fail(conn: psycopg.AsyncConnection[Any], claimed: Claimed, error: str) -> bool:
    """Move the instance to the dead letter (`failed`) with its last error."""
    return await _fenced(conn, FAIL, {"id": claimed.id, "epoch": claimed.epoch, "error": error})


async def wait(conn: psycopg.AsyncConnection[Any], claimed: Claimed, delay_ms: int) -> bool:
    """Release the instance until its current step's delay has passed (a durable wait)."""
    params = {"id": claimed.id, "epoch": claimed.epoch, "delay_ms": delay_ms}
    return await _fenced(conn, WAIT, params)


# Gives back claims that were never started (a stopping worker); attempts are untouched.
RELEASE_UNSTARTED = """
WITH released AS (
    UPDATE instances i
    SET state = 'scheduled', claimed_by = NULL, claim_incarnation = NULL,
        claimed_slot = NULL, updated_at = now()
    FROM unnest(%(ids)s::uuid[], %(epochs)s::bigint[]) AS r(id, epoch)
    WHERE i.id = r.id AND i.claim_epoch = r.epoch AND i.state = 'running'
    RETURNING i.id
)
SELECT (SELECT count(*) FROM released) AS released, pg_notify('orch8_work', '')
"""


async def release_unstarted(conn: psycopg.AsyncConnection[Any], claims: Sequence[Claimed]) -> int:
    """Put claimed-but-not-started instances back in the queue; return how many."""
    params = {"ids": [c.id for c in claims], "epochs": [c.epoch for c in claims]}
    cursor = await conn.execute(RELEASE_UNSTARTED, params)
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


# A worker or node that is gone: every claim it holds goes back, the epoch bumped so that
# a late write from it (a frozen process waking up) is refused.
#
# The same statement, narrowed, serves a live worker after a failed claim: a claim can
# commit and then lose its reply (the connection dropped in between), leaving rows that
# are this worker's but that it never heard of, which nothing else gives back while it
# lives. It releases the claims of its own slot that it does not hold (`held`), made since
# it began (`since`, the database's clock at its start): older ones are a previous
# process's in this slot, which the supervisor settles, charging the step that killed it;
# releasing them here would undo that charge.
RELEASE_OWNER = """
WITH released AS (
    UPDATE instances
    SET state = 'scheduled', claim_epoch = claim_epoch + 1, updated_at = now(),
        claimed_by = NULL, claim_incarnation = NULL, claimed_slot = NULL
    WHERE state = 'running' AND claim_incarnation = %(incarnation)s
      AND (%(slot)s::int IS NULL OR claimed_slot = %(slot)s::int)
      AND (%(since)s::timestamptz IS NULL OR claimed_at >= %(since)s::timestamptz)
      AND id <> ALL (%(held)s::uuid[])
    RETURNING id
)
SELECT (SELECT count(*) FROM released) AS released, pg_notify('orch8_work', '')
"""


def release_owner_params(incarnation: uuid.UUID, slot: int | None,
                         since: datetime | None = None,
                         held: Sequence[uuid.UUID] = ()) -> dict[str, Any]:
    return {"incarnation": incarnation, "slot": slot, "since": since, "held": list(held)}


async def release_unknown(conn: psycopg.AsyncConnection[Any], owner: Owner, since: datetime,
                          held: Sequence[uuid.UUID]) -> int:
    """Give back `owner`'s claims made since `since` that are not among `held`."""
    params = release_owner_params(owner.incarnation, owner.slot, since, held)
    row = await (await conn.execute(RELEASE_OWNER, params)).fetchone()
    return int(row[0]) if row else 0


def release_owner(
    conn: psycopg.Connection[Any], incarnation: uuid.UUID, slot: int | None = None
) -> int:
    """Release every claim of one incarnation (or one worker slot of it); return how many."""
    row = conn.execute(RELEASE_OWNER, release_owner_params(incarnation, slot)).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class HeldStep:
    """An instance a dead worker still held, as locked for settling its claim."""

    id: uuid.UUID
    epoch: int
    sequence_name: str
    sequence_version: int
    step_index: int
    # Attempts already charged at this step (the handler saw attempt + 1).
    attempt: int
    # `running`, or `scheduled` for steps a held claim ran (see `LOCK_HELD`).
    state: str


# The rows still held by one worker slot's claims among `ids`, locked until the caller's
# transaction ends, so that the charge and the release after it see them as they are now
# (a concurrent sweep of the same rows waits for us, or we for it, and re-checks).
# Scheduled rows too: steps the worker ran in a held claim (`LOCK_DUE`) left their row
# scheduled, as it was locked, when the process died; the caller charges only a row still
# where the process was running it.
LOCK_HELD = """
SELECT id, claim_epoch AS epoch, sequence_name, sequence_version, step_index, attempt,
    state
FROM instances
WHERE id = ANY(%(ids)s::uuid[])
  AND (state = 'running' AND claim_incarnation = %(incarnation)s
       AND claimed_slot = %(slot)s OR state = 'scheduled')
FOR UPDATE
"""


def lock_held(conn: psycopg.Connection[Any], incarnation: uuid.UUID, slot: int,
              ids: Sequence[uuid.UUID]) -> list[HeldStep]:
    """Lock the instances among `ids` still claimed by `slot` of `incarnation`."""
    params = {"ids": list(ids), "incarnation": incarnation, "slot": slot}
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(LOCK_HELD, params)
        return [HeldStep(**row) for row in cursor.fetchall()]


@dataclass(frozen=True)
class Charge:
    """One interrupted step charged an attempt: retried after `backoff_ms`, or failed
    (the dead letter) when `backoff_ms` is None."""

    id: uuid.UUID
    epoch: int
    error: str
    backoff_ms: int | None


# A step whose handler was running when its worker process died counts as an attempt.
# Fenced like every write after a claim (epoch and state: running, or scheduled for a
# held claim's step, see `LOCK_HELD`), and the epoch rises as in any
# release, so a write the dead process had in flight can never land.
CHARGE = """
UPDATE instances i
SET attempt = i.attempt + 1, last_error = c.error, claim_epoch = i.claim_epoch + 1,
    updated_at = now(), claimed_by = NULL, claim_incarnation = NULL, claimed_slot = NULL,
    state = CASE WHEN c.backoff_ms IS NULL THEN 'failed' ELSE 'scheduled' END,
    next_fire_at = CASE WHEN c.backoff_ms IS NULL THEN i.next_fire_at
                        ELSE now() + c.backoff_ms * interval '1 millisecond' END,
    finished_at = CASE WHEN c.backoff_ms IS NULL THEN now() END
FROM unnest(%(ids)s::uuid[], %(epochs)s::bigint[], %(errors)s::text[],
            %(backoff_ms)s::int[]) AS c(id, epoch, error, backoff_ms)
WHERE i.id = c.id AND i.claim_epoch = c.epoch AND i.state IN ('running', 'scheduled')
RETURNING i.id, i.state
"""


def charge(conn: psycopg.Connection[Any], charges: Sequence[Charge]) -> dict[uuid.UUID, str]:
    """Charge each step an attempt; return the new state of each instance it applied to."""
    if not charges:
        return {}
    params = {"ids": [c.id for c in charges], "epochs": [c.epoch for c in charges],
              "errors": [c.error for c in charges],
              "backoff_ms": [c.backoff_ms for c in charges]}
    return {row[0]: row[1] for row in conn.execute(CHARGE, params).fetchall()}
