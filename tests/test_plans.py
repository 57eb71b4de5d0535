"""The hot statements keep their plan and their cost, whatever else the table holds.

A queue's table swings from empty to millions of rows in minutes, so the statistics the
planner sees are often stale: analyzed empty, or full of finished history. The claim, the
finish and the queue depth (`GET /queue`, the queue-depth gauge) must still read only
what they return, and rows scheduled for later (at any priority) must cost them nothing,
on every supported server version (PostgreSQL 18 hides some of this with skip scans;
15 does not).

The plans are those of the engine's own calls (`auto_explain` reports each statement's
`EXPLAIN (ANALYZE, BUFFERS)` back to the session as a notice), so these tests hold
whatever the statements' text becomes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from engine_helpers import finish_steps
from psycopg.conninfo import make_conninfo

from orch8.model import State
from orch8.store import claims, wire
from orch8.store.claims import Owner, StepDone
from orch8.store.instances import list_instances, queue_depth

FUTURE_ROWS = 100_000
# Extra buffers allowed with the future rows present. A deeper index costs a page more per
# descent (a claim descends its index once per priority, and each row it writes updates
# half a dozen indexes); walking the future rows would cost a page per ~300 of them.
SMALL = 150

# How the claim may reach instances: candidates from the claim index in its order (never
# a sort of every due row), the rows it writes by id (one by one, or the array of them
# through a bitmap) or, in a held claim, where it locked them (a TID scan), a full key's
# backlog by key.
CLAIM_READS = {"Index Scan on instances_claim_order", "Index Scan on instances_pkey",
               "Bitmap Index Scan on instances_pkey", "Index Scan on instances_ready_by_key",
               "Bitmap Index Scan on instances_ready_by_key", "Tid Scan"}
# A held claim's: its lock reads the claim index, its write finds the rows it locked.
HELD_READS = {"Index Scan on instances_claim_order", "Tid Scan"}

# Statistics the planner may see when the work arrives.
STATISTICS = ["analyzed empty", "analyzed full of history", "fresh"]
# Statistics taken once the work is there (autovacuum analyzes during a long backlog),
# without or with a large history.
WORK_ANALYZED = "analyzed with the work present"
HISTORY_ANALYZED = "analyzed with 10^6 rows of history"


def explaining(dsn: str) -> str:
    """`dsn` with every top-level statement's analyzed plan sent back as a notice."""
    settings = {"session_preload_libraries": "auto_explain",
                "auto_explain.log_min_duration": "0", "auto_explain.log_analyze": "on",
                "auto_explain.log_buffers": "on", "auto_explain.log_timing": "off",
                "auto_explain.log_format": "json", "auto_explain.log_level": "notice"}
    return make_conninfo(dsn, options=" ".join(f"-c {k}={v}" for k, v in settings.items()))


class Plans(list[dict[str, Any]]):
    """The plans of the statements run while it listens, as `auto_explain` gives them."""

    def hear(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        text = diagnostic.message_primary or ""
        if "plan:" in text:
            self.append(json.loads(text.split("plan:", 1)[1])["Plan"])

    def buffers(self) -> int:
        return sum(plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
                   for plan in self)

    def instance_reads(self) -> set[str]:
        """How each statement reached `instances`: 'Index Scan on <index>', 'Seq Scan'..."""
        return {read for plan in self for read in _reads(plan)}


def _reads(node: dict[str, Any]) -> Iterator[str]:
    # A bitmap heap scan is named by its bitmap index scans (its children).
    kind = node["Node Type"]
    if kind in ("Seq Scan", "Tid Scan") and node["Relation Name"] == "instances":
        yield kind
    elif kind.endswith("Index Scan") and node["Index Name"].startswith("instances_"):
        yield f"{kind} on {node['Index Name']}"
    for child in node.get("Plans", []):
        yield from _reads(child)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("INSERT INTO sequences (name, version, steps) "
                           "VALUES ('s', 1, '[{\"id\": \"only\", \"handler\": \"noop\"}]')")
        yield connection


def add(conn: psycopg.Connection[Any], count: int, *, state: str = "scheduled",
        due: bool = True, every_priority: bool = False) -> None:
    """`count` instances, due or three hours ahead, `normal` or of every priority."""
    conn.execute("""
        INSERT INTO instances (id, sequence_name, sequence_version, state, priority,
                               next_fire_at)
        SELECT gen_random_uuid(), 's', 1, %(state)s,
               CASE WHEN %(every_priority)s THEN g %% 4 ELSE 1 END,
               CASE WHEN %(due)s THEN now() - interval '1 second' - g * interval '1 ms'
                    ELSE now() + interval '3 hours' + g * interval '1 ms' END
        FROM generate_series(1, %(count)s) AS g""",
                 {"state": state, "due": due, "every_priority": every_priority, "count": count})


def add_due_work(conn: psycopg.Connection[Any], statistics: str) -> None:
    """20,000 due instances at every priority, under the statistics named (`STATISTICS`,
    `WORK_ANALYZED` or `HISTORY_ANALYZED`)."""
    if statistics == HISTORY_ANALYZED:
        add(conn, 1_000_000, state="completed", every_priority=True)
    else:
        prepare(conn, statistics)
    add(conn, 20_000, every_priority=True)
    if statistics in (WORK_ANALYZED, HISTORY_ANALYZED):
        conn.execute("ANALYZE instances")


def add_future_rows(conn: psycopg.Connection[Any]) -> None:
    """Rows scheduled three hours ahead, at every priority."""
    add(conn, FUTURE_ROWS, due=False, every_priority=True)


def prepare(conn: psycopg.Connection[Any], statistics: str) -> None:
    """The statistics the planner will see once the work arrives (see STATISTICS)."""
    if statistics == "analyzed full of history":
        add(conn, FUTURE_ROWS, state="completed", every_priority=True)
    if statistics != "fresh":
        conn.execute("ANALYZE instances")


def claim(dsn: str, limit: int = 50, held: bool = False) -> tuple[list[claims.Claimed], Plans]:
    """One claim (`held`: a held claim that completes what it locked, as a worker's held
    claim of instant steps does); what it took, and the plans."""
    async def run() -> tuple[list[claims.Claimed], Plans]:
        plans = Plans()
        async with await psycopg.AsyncConnection.connect(explaining(dsn),
                                                         autocommit=True) as aconn:
            aconn.add_notice_handler(plans.hear)
            owner = Owner("n", uuid.uuid4(), 0)
            taken = (await held_claim(aconn, owner, limit) if held
                     else await claims.claim(aconn, owner, limit))
        return taken, plans

    return asyncio.run(run())


async def held_claim(aconn: psycopg.AsyncConnection[Any], owner: Owner,
                     limit: int) -> list[claims.Claimed]:
    """Lock up to `limit` due instances and complete them in the same transaction,
    pipelined, as a worker's held claim of one-step instant instances does (`lock_due`
    begins it, `settle_locked` commits it)."""
    async with wire.Pipeline(aconn) as pipeline:
        lock = claims.lock_due(pipeline, owner, limit)
        await pipeline.sync()
        locked, _ = claims.locked(pipeline, lock)
        claims.settle_locked(pipeline, owner, [(c.id, c.epoch, 1, True, c.ctid) for c in locked],
                             [(c.id, "only", 0, orjson.Fragment("{}")) for c in locked])
    return locked


def finish(dsn: str, ids: list[uuid.UUID]) -> Plans:
    """Complete the (one-step, running at epoch 1) instances `ids` as the engine does."""
    done = [StepDone(id=i, epoch=1, step_id="only", attempt=0, output_json="{}",
                     next_index=1, last=True) for i in ids]

    async def run() -> Plans:
        plans = Plans()
        async with await psycopg.AsyncConnection.connect(explaining(dsn),
                                                         autocommit=True) as aconn:
            aconn.add_notice_handler(plans.hear)
            assert await finish_steps(aconn, done) == set(ids)
        return plans

    return asyncio.run(run())


def claims_on_one_connection(dsn: str, limits: list[int], *, finish_each: bool = False,
                             with_finish: bool = False, held: bool = False,
                             warmed_for: int | None = None
                             ) -> tuple[list[int], Plans, list[tuple[str, int, int]]]:
    """Claim once per limit on one connection, as a worker does all day (completing each
    batch if `finish_each`, which frees its slots; or, `with_finish`, claiming each batch
    after the first with the statement that completes the one before it; or, `held`, in
    held claims that complete what they lock, on a connection first made ready for
    claims of up to `warmed_for`, if given, as a worker's are); return how many each claim
    took, the plans, and the connection's prepared statements with their generic and
    custom plans."""
    async def run() -> tuple[list[int], Plans, list[tuple[str, int, int]]]:
        plans = Plans()
        async with await psycopg.AsyncConnection.connect(explaining(dsn),
                                                         autocommit=True) as aconn:
            if warmed_for is not None:
                await claims.warm_up(aconn, warmed_for)
            aconn.add_notice_handler(plans.hear)
            owner = Owner("n", uuid.uuid4(), 0)
            taken: list[int] = []
            batch: list[claims.Claimed] = []
            for limit in limits:
                if held:
                    batch = await held_claim(aconn, owner, limit)
                elif with_finish and batch:
                    refilled = await claims.finish_and_claim(aconn, completed(batch), owner,
                                                             limit)
                    assert refilled.refused == set()
                    batch = refilled.claimed
                else:
                    batch = await claims.claim(aconn, owner, limit)
                taken.append(len(batch))
                if finish_each:
                    await finish_steps(aconn, completed(batch))
            cursor = await aconn.execute(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
            return taken, plans, await cursor.fetchall()

    return asyncio.run(run())


def completed(batch: list[claims.Claimed]) -> list[StepDone]:
    """The one step of each claimed (one-step) instance, done."""
    return [StepDone(id=c.id, epoch=c.epoch, step_id="only", attempt=0, output_json="{}",
                     next_index=1, last=True) for c in batch]


def depth(dsn: str) -> tuple[dict[str, int], Plans]:
    plans = Plans()
    with psycopg.connect(explaining(dsn), autocommit=True) as listening:
        listening.add_notice_handler(plans.hear)
        return queue_depth().run(listening), plans


@pytest.mark.parametrize("held", [False, True], ids=["claim", "held claim"])
def test_a_claim_costs_the_same_with_rows_scheduled_for_later(dsn, conn, held):
    # Fewer due rows than a batch: the claim must not walk on past them.
    add(conn, 5)
    taken, plans = claim(dsn, held=held)
    alone = plans.buffers()
    add(conn, 5)
    add_future_rows(conn)
    conn.execute("ANALYZE instances")
    taken_later, plans = claim(dsn, held=held)
    assert (len(taken), len(taken_later)) == (5, 5)
    assert plans.buffers() <= alone + SMALL, (alone, plans.buffers())


def test_queue_depth_costs_the_same_with_rows_scheduled_for_later(dsn, conn):
    add(conn, 5)
    _, plans = depth(dsn)
    alone = plans.buffers()
    add_future_rows(conn)
    conn.execute("ANALYZE instances")
    seen, plans = depth(dsn)
    assert seen["normal"] == 5 and seen["total"] == 5
    assert plans.buffers() <= alone + SMALL // 4, (alone, plans.buffers())


@pytest.mark.parametrize("held", [False, True], ids=["claim", "held claim"])
@pytest.mark.parametrize("statistics", STATISTICS)
def test_the_claim_reads_its_index_whatever_the_statistics(dsn, conn, statistics, held):
    prepare(conn, statistics)
    add(conn, 20_000, every_priority=True)
    taken, plans = claim(dsn, held=held)
    assert len(taken) == 50
    assert plans.instance_reads() <= CLAIM_READS, plans.instance_reads()
    assert "Index Scan on instances_claim_order" in plans.instance_reads()


# How a worker claims: in a held claim; by itself; or (while a backlog of claimed
# instances lasts) in the statement that records the outcomes of its last batch; and
# which of its prepared statements that is.
CLAIMING = {
    "held": ({"held": True}, lambda text: "AS keyed" in text),
    "alone": ({}, lambda text: "candidate AS MATERIALIZED" in text
              and "jsonb_array_elements" not in text),
    "with the finish": ({"with_finish": True}, lambda text: "candidate AS MATERIALIZED" in text
                        and "jsonb_array_elements" in text),
}


@pytest.mark.parametrize("claiming", CLAIMING)
@pytest.mark.parametrize("statistics", [*STATISTICS, WORK_ANALYZED])
def test_a_worker_keeps_one_generic_claim_plan_that_reads_the_claim_index(dsn, conn, statistics,
                                                                          claiming):
    # A worker claims on the same connections all day, with limits that vary with its free
    # slots. PostgreSQL must settle on one plan for the prepared claim (not plan each one
    # afresh), and that plan must read what a fresh one reads and take exactly the limit.
    # Statistics that know the backlog (autovacuum analyzes during a long one) are what
    # used to make every claim planned afresh. The same holds for the statement that
    # finishes a batch and claims the next, which must also find what it finishes by id.
    add_due_work(conn, statistics)
    limits = [50, 33, 41, 64, 50, 37, 50, 45, 58, 50, 36, 50, 50, 44, 50]
    how, is_claim = CLAIMING[claiming]
    taken, plans, prepared = claims_on_one_connection(dsn, limits, **how)
    assert taken == limits
    [(_, generic, custom)] = [row for row in prepared if is_claim(row[0])]
    # psycopg prepares a statement on its sixth use; PostgreSQL plans the first five
    # prepared runs afresh, then compares.
    assert generic >= 1 and custom <= 5, (generic, custom)
    assert plans.instance_reads() <= CLAIM_READS, plans.instance_reads()
    assert "Index Scan on instances_claim_order" in plans.instance_reads()


@pytest.mark.parametrize("statistics", [*STATISTICS, WORK_ANALYZED, HISTORY_ANALYZED])
def test_held_claims_run_on_generic_plans_from_the_first(dsn, conn, statistics):
    # A held claim's transaction asks for generic plans (`claims.GENERIC_PLANS`), and a
    # worker's connection makes them before its first claim (`claims.warm_up`): no claim
    # is planned for its values, the first ones included, whatever PostgreSQL would have
    # chosen (with 10^6 rows of history it used to plan every lock afresh); and the
    # generic plan reads what a fresh one reads: the claim index, then (the write) the
    # locked rows where the lock found them, no index.
    add_due_work(conn, statistics)
    limits = [50, 50, 41, 64, 33, 50, 50, 50]  # (one bound, 64: one lock statement)
    taken, plans, prepared = claims_on_one_connection(dsn, limits, held=True, warmed_for=50)
    assert taken == limits
    runs = {("lock" if "AS keyed" in statement else "write"): (generic, custom)
            for statement, generic, custom in prepared
            if "AS keyed" in statement or "settled AS" in statement}
    # (The warm-up's run and each claim's, all on the generic plan.)
    assert runs == {"lock": (len(limits) + 1, 0), "write": (len(limits) + 1, 0)}, runs
    assert plans.instance_reads() == HELD_READS, plans.instance_reads()


def add_keyed(conn: psycopg.Connection[Any], waiting: bool) -> None:
    """20,000 instances at every priority, a third under 50 keys of two slots each, a
    quarter scheduled; the keyed ones parked as slot waiters if `waiting`."""
    conn.execute("""
        INSERT INTO instances (id, sequence_name, sequence_version, state, priority,
                               next_fire_at, concurrency_key, max_concurrency)
        SELECT gen_random_uuid(), 's', 1,
               (ARRAY['scheduled','completed','completed','completed'])[1 + g % 4],
               g % 4, now() - (g || ' seconds')::interval,
               CASE WHEN g % 3 = 0 THEN 'key-' || (g % 50) END,
               CASE WHEN g % 3 = 0 THEN 2 END
        FROM generate_series(1, 20000) AS g""")
    if waiting:
        conn.execute("UPDATE instances SET waiting_for_slot = true "
                     "WHERE concurrency_key IS NOT NULL AND state = 'scheduled'")
    conn.execute("ANALYZE")


def test_the_claim_reads_its_index_with_keys_and_waiters_present(dsn, conn):
    add_keyed(conn, waiting=True)
    taken, plans = claim(dsn)
    assert len(taken) == 50
    assert "Index Scan on instances_claim_order" in plans.instance_reads()
    assert plans.instance_reads() <= CLAIM_READS, plans.instance_reads()


def test_a_worker_keeps_one_generic_plan_for_keyed_claims_too(dsn, conn):
    # Keyed candidates send the claim with the slot machinery (`claims.CLAIM`) after the
    # plain one. Finishing each batch frees its slots, so every claim seats keyed ones.
    add_keyed(conn, waiting=False)
    taken, plans, prepared = claims_on_one_connection(dsn, [50] * 30, finish_each=True)
    keyed = [(generic, custom) for statement, generic, custom in prepared
             if "slot AS MATERIALIZED" in statement]
    assert taken == [50] * 30
    assert keyed and any(generic >= 1 for generic, _ in keyed), keyed
    assert all(custom <= 5 for _, custom in keyed), keyed
    assert plans.instance_reads() <= CLAIM_READS, plans.instance_reads()


@pytest.mark.parametrize("statistics", STATISTICS)
def test_queue_depth_reads_only_the_queue_whatever_the_statistics(dsn, conn, statistics):
    prepare(conn, statistics)
    add(conn, 2_000)
    add_future_rows(conn)
    conn.execute("UPDATE instances SET waiting_for_slot = true WHERE id IN ("
                 "SELECT id FROM instances WHERE state = 'scheduled' LIMIT 3)")
    seen, plans = depth(dsn)
    assert seen["total"] >= 2_000
    # Due rows through the claim index, slot waiters through theirs; never the table.
    assert all(read.endswith(("instances_claim_order", "instances_slot_waiters"))
               for read in plans.instance_reads()), plans.instance_reads()


def running(conn: psycopg.Connection[Any], count: int) -> list[uuid.UUID]:
    """`count` instances running at epoch 1 (claimed by someone)."""
    rows = conn.execute("""
        INSERT INTO instances (id, sequence_name, sequence_version, state, claim_epoch,
                               claimed_by, claim_incarnation, claimed_slot)
        SELECT gen_random_uuid(), 's', 1, 'running', 1, 'other', gen_random_uuid(), 0
        FROM generate_series(1, %(count)s)
        RETURNING id""", {"count": count}).fetchall()
    return [row[0] for row in rows]


@pytest.mark.parametrize("statistics", STATISTICS)
def test_the_finish_costs_the_same_with_work_running_elsewhere(dsn, conn, statistics):
    prepare(conn, statistics)
    # A few rows, as in the claim test: each row written costs a page per index level,
    # and the levels grow (slowly) with the table.
    alone = finish(dsn, running(conn, 5)).buffers()
    running(conn, 10_000)
    add_future_rows(conn)
    if statistics == "fresh":
        conn.execute("ANALYZE instances")
    plans = finish(dsn, running(conn, 5))
    # Each finished row is found by its id, never by scanning what runs elsewhere.
    # By id through the primary key (a plain or a bitmap scan of it), never a state index.
    assert plans.instance_reads() <= {"Index Scan on instances_pkey",
                                      "Bitmap Index Scan on instances_pkey"}, plans.instance_reads()
    assert plans.instance_reads(), "the finish read no instance at all"
    assert plans.buffers() <= alone + SMALL, (alone, plans.buffers())


def listing(dsn: str, state: State) -> tuple[list[Any], Plans]:
    plans = Plans()
    with psycopg.connect(explaining(dsn), autocommit=True) as listening:
        listening.add_notice_handler(plans.hear)
        return list_instances(state=state, limit=20).run(listening), plans


@pytest.mark.parametrize("statistics", STATISTICS)
def test_listing_a_rare_state_reads_its_own_index_not_the_history(dsn, conn, statistics):
    # Listing by state has no index of its own (every write would pay for it, migration
    # 004): running rows and the dead letter are found through their partial indexes,
    # however much finished history lies in the table.
    prepare(conn, statistics)
    add(conn, FUTURE_ROWS, state="completed")
    running(conn, 30)
    add(conn, 30, state="failed")
    conn.execute("ANALYZE instances")
    for state, index in ((State.RUNNING, "instances_running_by_incarnation"),
                         (State.FAILED, "instances_dead_letter")):
        found, plans = listing(dsn, state)
        assert len(found) == 20 and {i.state for i in found} == {state}
        assert any(read.endswith(index) for read in plans.instance_reads()), (
            state, plans.instance_reads())
        assert "Seq Scan" not in plans.instance_reads()
        assert plans.buffers() < 200, (state, plans.buffers())
