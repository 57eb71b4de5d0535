"""The fault suite's harness: real nodes on one PostgreSQL, a ledger outside it, a verdict.

A `FaultRun` starts nodes through `supervisor_process.Cluster` (each node its own process
group), loads `fault_handlers` into their workers, and remembers every fault it causes:
which processes it killed or froze, and when by the database's clock. `verdict()` then
holds three records against each other: the instances the run accepted, the ledger of
handler executions (`fault_handlers`), and the audit rows that triggers on `instances` and
`step_outputs` wrote. It prints the figures and returns them for the test to assert.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from supervisor_process import Cluster, Node, wait_until, worker_pids

from orch8 import Client

TERMINAL = ("completed", "failed", "cancelled")

AUDIT = """
CREATE TABLE test_step_writes (
    instance_id uuid NOT NULL, step_id text NOT NULL, op text NOT NULL,
    incarnation text, pid integer, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION test_audit_step_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_step_writes (instance_id, step_id, op, incarnation, pid)
    VALUES (NEW.instance_id, NEW.step_id, TG_OP, NEW.output->>'incarnation',
            (NEW.output->>'pid')::integer);
    RETURN NULL;
END $$;
CREATE TRIGGER test_audit_step_write AFTER INSERT OR UPDATE ON step_outputs
    FOR EACH ROW EXECUTE FUNCTION test_audit_step_write();

-- Claims (with the time they were due) and forced releases (the epoch rose while running).
CREATE TABLE test_claim_moves (
    instance_id uuid NOT NULL, kind text NOT NULL, incarnation uuid, slot integer,
    epoch bigint NOT NULL, due timestamptz, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION test_audit_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = 'scheduled' AND NEW.state = 'running' THEN
        INSERT INTO test_claim_moves (instance_id, kind, incarnation, slot, epoch, due)
        VALUES (NEW.id, 'claim', NEW.claim_incarnation, NEW.claimed_slot, NEW.claim_epoch,
                OLD.next_fire_at);
    ELSIF OLD.state = 'running' AND NEW.state = 'scheduled'
          AND NEW.claim_epoch > OLD.claim_epoch THEN
        INSERT INTO test_claim_moves (instance_id, kind, incarnation, slot, epoch)
        VALUES (NEW.id, 'reclaim', OLD.claim_incarnation, OLD.claimed_slot, NEW.claim_epoch);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER test_audit_claim AFTER UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION test_audit_claim();
"""

# A worker that dies mid-step has its running steps charged an attempt (orch8 cannot tell
# which of them killed it): with a retry policy they run again, as a kill here expects.
RETRY = {"max_attempts": 5, "initial_backoff_ms": 50, "max_backoff_ms": 200}

SEQUENCES = {
    # Two short steps: the common path.
    "pair": [{"id": "a", "handler": "ledger", "params": {"ms": 20}, "retry": RETRY},
             {"id": "b", "handler": "ledger", "params": {"ms": 20}, "retry": RETRY}],
    # Steps long enough that a node always holds claims when it is hit.
    "slow": [{"id": "a", "handler": "ledger", "params": {"ms": 400}, "retry": RETRY},
             {"id": "b", "handler": "ledger", "params": {"ms": 400}, "retry": RETRY}],
    # A durable delay between the steps.
    "delayed": [{"id": "a", "handler": "ledger", "params": {"ms": 10}, "retry": RETRY},
                {"id": "b", "handler": "ledger", "delay_ms": 300, "params": {"ms": 10},
                 "retry": RETRY}],
}

# Scheduling slack on top of a bound, for a loaded 2-core CI machine (printed with it).
LOAD_SLACK_S = 1.0


def query(dsn: str, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(sql, params or {}).fetchall()]  # type: ignore[arg-type]


def db_now(dsn: str) -> datetime:
    return query(dsn, "SELECT clock_timestamp()")[0][0]  # type: ignore[no-any-return]


@dataclass
class Fault:
    """Something the run did to a node: the processes it hit, and when (database clock)."""

    what: str
    node_id: str
    pids: set[int]
    incarnation: str | None
    at: datetime


@dataclass
class Figures:
    scenario: str
    accepted: int = 0
    lost: int = 0
    doubled: int = 0
    overwritten: int = 0
    executions: int = 0
    repeated: int = 0
    unexplained_repeats: int = 0
    early_starts: int = 0
    fenced_late_writes: int = 0
    stuck: int = 0
    reclaim_s: list[float] = field(default_factory=list)
    reclaim_bound_s: tuple[float, float] | None = None
    drain_s: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def show(self) -> str:
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        shown["reclaim_s"] = [round(x, 3) for x in self.reclaim_s]
        shown["drain_s"] = [round(x, 3) for x in self.drain_s]
        return json.dumps(shown, default=str)


class FaultRun:
    def __init__(self, dsn: str, directory: Path, **settings: str) -> None:
        self.dsn = dsn
        directory.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(dsn, directory)
        self.ledger = directory / "ledger.jsonl"
        self.ledger.touch()
        self.settings = {"ORCH8_HEARTBEAT_INTERVAL_SECS": "1", "ORCH8_STALE_THRESHOLD_SECS": "4",
                         "ORCH8_HANDLERS": "fault_handlers", "FAULT_LEDGER": str(self.ledger),
                         **settings}
        self.faults: list[Fault] = []
        self.accepted: list[uuid.UUID] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(AUDIT)
        with Client(dsn) as client:
            for name, steps in SEQUENCES.items():
                client.create_sequence(name, steps)

    # -- settings ----------------------------------------------------------------------

    def seconds(self, name: str) -> float:
        return float(self.settings[name])

    @property
    def heartbeat_s(self) -> float:
        return self.seconds("ORCH8_HEARTBEAT_INTERVAL_SECS")

    @property
    def threshold_s(self) -> float:
        return self.seconds("ORCH8_STALE_THRESHOLD_SECS")

    def reclaim_bound(self) -> tuple[float, float]:
        """(threshold - heartbeat, threshold + heartbeat + tick]: when a dead node's claims
        go back, counted from its death (its last beat may be up to one interval old)."""
        tick = float(self.settings.get("ORCH8_TICK_INTERVAL_MS", "50")) / 1000
        return (self.threshold_s - self.heartbeat_s, self.threshold_s + self.heartbeat_s + tick)

    # -- nodes -------------------------------------------------------------------------

    def start(self, node_id: str, wait_ready: bool = True, **extra: str) -> Node:
        return self.cluster.start(node_id, wait_ready=wait_ready, **(self.settings | extra))

    def incarnation(self, node_id: str) -> str | None:
        rows = query(self.dsn, "SELECT incarnation::text FROM cluster_nodes WHERE id = %(id)s",
                     {"id": node_id})
        return rows[0][0] if rows else None

    def holds_claims(self, incarnation: str | None, slot: int | None = None) -> bool:
        rows = query(self.dsn, """
            SELECT EXISTS (SELECT 1 FROM instances WHERE state = 'running'
                           AND claim_incarnation = %(inc)s
                           AND (%(slot)s::int IS NULL OR claimed_slot = %(slot)s::int))
            """, {"inc": incarnation, "slot": slot})
        return bool(rows[0][0])

    def note(self, what: str, node: Node, pids: set[int]) -> Fault:
        """Remember a fault that touched `pids` of `node`, timed by the database's clock."""
        fault = Fault(what, node.node_id, pids, self.incarnation(node.node_id), db_now(self.dsn))
        self.faults.append(fault)
        return fault

    def hit(self, what: str, node: Node, number: int, pids: set[int] | None = None,
            touched: set[int] | None = None) -> Fault:
        """Send `number` to `pids` (default: the node's whole process group) and note it;
        `touched`: the processes it affects (default: those it was sent to)."""
        fault = self.note(what, node, touched or pids or self.node_pids(node))
        if pids is None:
            node.signal_group(number)
        else:
            for pid in pids:
                os.kill(pid, number)
        return fault

    def node_pids(self, node: Node) -> set[int]:
        return {node.pid, *worker_pids(node.node_id, under=node.pid)}

    def wait_holding(self, node: Node, slot: int | None = None, timeout: float = 30) -> str:
        incarnation = self.incarnation(node.node_id)
        wait_until(lambda: self.holds_claims(incarnation, slot), timeout,
                   f"{node.node_id} to hold claims")
        assert incarnation is not None
        return incarnation

    def reclaimed_at(self, incarnation: str, slot: int | None = None) -> datetime | None:
        rows = query(self.dsn, """
            SELECT min(at) FROM test_claim_moves WHERE kind = 'reclaim'
              AND incarnation = %(inc)s AND (%(slot)s::int IS NULL OR slot = %(slot)s::int)
            """, {"inc": incarnation, "slot": slot})
        return rows[0][0]  # type: ignore[no-any-return]

    def wait_reclaimed(self, fault: Fault, slot: int | None = None, timeout: float = 30) -> float:
        """Seconds from the fault to the first forced release of its claims."""
        assert fault.incarnation is not None
        at = wait_until(lambda: self.reclaimed_at(fault.incarnation, slot), timeout,  # type: ignore[arg-type]
                        f"the claims of {fault.node_id} to be reclaimed")
        return float((at - fault.at).total_seconds())

    def fenced_total(self, nodes: list[Node]) -> int:
        total = 0.0
        for node in nodes:
            text = node.get("/metrics").text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "orch8_fenced_writes_rejected_total":
                        total += sample.value
        return int(total)

    # -- load --------------------------------------------------------------------------

    def submit(self, requests: list[dict[str, Any]]) -> list[uuid.UUID]:
        with Client(self.dsn) as client:
            ids = [created.id for created in client.start_many(requests)]
        self.accepted.extend(ids)
        return ids

    def pending(self) -> bool:
        """Is any accepted instance not finished? (one EXISTS probe)"""
        rows = query(self.dsn, "SELECT EXISTS (SELECT 1 FROM instances WHERE state NOT IN "
                               "('completed', 'failed', 'cancelled'))")
        return bool(rows[0][0])

    def wait_settled(self, timeout: float) -> None:
        try:
            wait_until(lambda: not self.pending(), timeout, "every instance to finish", 0.2)
        except AssertionError:
            pass  # what is left counts as lost in the verdict

    # -- verdict -----------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.ledger.read_bytes().splitlines() if line]

    def verdict(self, scenario: str, late_from: set[int] | None = None) -> Figures:
        """The figures of this run; `late_from`: processes whose late outcomes to count (by
        pid: a frozen worker reads its claim only after it thaws, so the ledger's incarnation
        of a step it started then is already its successor's)."""
        figures = Figures(scenario, accepted=len(self.accepted))
        final = dict(query(self.dsn, "SELECT id, state FROM instances WHERE id = ANY(%(ids)s)",
                           {"ids": self.accepted}))
        figures.lost = sum(1 for i in self.accepted if final.get(i) not in TERMINAL)
        writes = query(self.dsn, "SELECT instance_id, step_id, op, pid FROM test_step_writes")
        per_step = Counter((row[0], row[1]) for row in writes)
        figures.doubled = sum(1 for count in per_step.values() if count > 1)
        figures.overwritten = sum(1 for row in writes if row[2] == "UPDATE")
        figures.early_starts = query(self.dsn, "SELECT count(*) FROM test_claim_moves "
                                               "WHERE kind = 'claim' AND at < due")[0][0]
        figures.stuck = query(self.dsn, """
            SELECT count(*) FROM instances i WHERE state = 'running' AND NOT EXISTS (
                SELECT 1 FROM cluster_nodes n WHERE n.incarnation = i.claim_incarnation
                AND n.state <> 'dead')""")[0][0]
        self._repeats(figures)
        if late_from:
            recorded_by = {(str(row[0]), row[1]): row[3] for row in writes}
            figures.fenced_late_writes = sum(
                1 for e in self.entries() if e["event"] == "end" and e["pid"] in late_from
                and recorded_by.get((e["instance"], e["step"])) != e["pid"])
        figures.reclaim_bound_s = self.reclaim_bound()
        return figures

    def _repeats(self, figures: Figures) -> None:
        starts: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
        for entry in self.entries():
            if entry["event"] == "start":
                starts[(entry["instance"], entry["step"], entry["attempt"])].append(entry)
        figures.executions = sum(len(runs) for runs in starts.values())
        hit_pids = {pid for fault in self.faults for pid in fault.pids}
        hit_incarnations = {fault.incarnation for fault in self.faults}
        for runs in starts.values():
            for earlier in runs[:-1]:
                figures.repeated += 1
                explained = (earlier["pid"] in hit_pids
                             or earlier["incarnation"] in hit_incarnations)
                figures.unexplained_repeats += not explained

    def close(self) -> None:
        self.cluster.close()


def report(figures: Figures, allow_repeats: bool = True) -> None:
    """Print the figures (and keep them for the README table), then assert the promises."""
    line = figures.show()
    print(f"\nFAULT FIGURES {line}")
    path = os.environ.get("FAULT_FIGURES")
    if path:
        with open(path, "a") as sink:
            sink.write(line + "\n")
    assert figures.lost == 0, f"lost instances: {line}"
    assert figures.doubled == 0 and figures.overwritten == 0, f"outcome recorded twice: {line}"
    assert figures.early_starts == 0, f"started before next_fire_at: {line}"
    assert figures.stuck == 0, f"stuck under a dead owner: {line}"
    assert figures.unexplained_repeats == 0, f"a repeat no kill or freeze explains: {line}"
    if not allow_repeats:
        assert figures.repeated == 0, f"repeated executions: {line}"


class ReadyWatch:
    """Polls /health/ready of the given nodes; records every moment none of them was ready."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.samples: list[tuple[float, dict[str, int | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=1) as client:
            while not self._stop.is_set():
                seen: dict[str, int | None] = {}
                for node in list(self.nodes):
                    try:
                        seen[node.node_id] = client.get(node.url("/health/ready")).status_code
                    except httpx.HTTPError:
                        seen[node.node_id] = None
                self.samples.append((time.monotonic(), seen))
                self._stop.wait(0.05)

    def none_ready(self) -> int:
        return sum(1 for _, seen in self.samples if 200 not in seen.values())


def drain_and_wait(node: Node, send: Any, timeout: float = 60) -> tuple[int, float]:
    """Start a drain with `send()`, wait for the node to exit: (exit code, seconds)."""
    started = time.monotonic()
    send()
    try:
        code = node.wait_exit(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{node.node_id} did not exit in {timeout}s:\n{node.log()}") from None
    return code, time.monotonic() - started


class Load:
    """Submits `per_second` instances of `sequence` in small batches until stopped."""

    def __init__(self, run: FaultRun, sequence: str, per_second: int, **options: Any) -> None:
        self.run, self.sequence, self.per_second, self.options = run, sequence, per_second, options
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._submit, daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _submit(self) -> None:
        batch = max(1, self.per_second // 10)
        requests = [{"sequence": self.sequence, **self.options}] * batch
        while not self._stop.is_set():
            try:
                with Client(self.run.dsn) as client:
                    while not self._stop.is_set():
                        self.run.accepted.extend(
                            created.id for created in client.start_many(requests))
                        self._stop.wait(0.1)
            except Exception as error:  # the database is restarting: not accepted, retried
                self.errors.append(type(error).__name__)
                self._stop.wait(0.2)
