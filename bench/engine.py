"""orch8 as a user runs it: real `orch8-supervisor` processes, work given through the public
client, completion seen by SQL reads.

A backlog is inserted in one open transaction while the nodes boot, and committed once
every node answers `/health/ready`: the whole backlog becomes visible at one instant, with
a NOTIFY on the channel the workers listen on, so a drain is timed from that commit (the
database clock) to the last `finished_at`. Completion is probed in O(1) (`DRAINING`), on a
session started before the release (`Watch`).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.runs import Figure
from bench.server import commit_stamped
from orch8 import Client, enqueue_many
from orch8.client import MAX_BATCH

ROOT = Path(__file__).resolve().parent.parent
SUPERVISOR = str(Path(sys.executable).parent / "orch8-supervisor")
NOOP = [{"id": "only", "handler": "noop", "params": {}}]
NORMAL = 1  # the priority the client gives when none is asked for
_SEQUENCES = itertools.count()

# O(1): each EXISTS stops at the first entry of a partial index (the claim order index
# holds scheduled rows only, in (priority, next_fire_at) order; the running index holds
# running rows only). Rows scheduled in the future or at another priority are not read.
# Each condition names its index's whole predicate (`NOT waiting_for_slot` too; the bench
# uses no concurrency keys), or the planner cannot use the index and reads the table: with
# 10^6 rows of history, a probe every 20 ms then took most of a core from the drain.
# Running rows are looked up per node (each node's first, through the running index), and
# those of `ELSEWHERE` (a stand-in node some scenarios give running work) are not ours.
DRAINING = """
SELECT EXISTS (SELECT 1 FROM instances
               WHERE state = 'scheduled' AND NOT waiting_for_slot
                 AND priority = %(priority)s AND next_fire_at <= now())
    OR EXISTS (SELECT 1 FROM cluster_nodes n CROSS JOIN LATERAL (
                   SELECT 1 FROM instances i
                   WHERE i.state = 'running' AND i.claim_incarnation = n.incarnation
                   LIMIT 1) mine
               WHERE n.id <> %(elsewhere)s)
"""
ELSEWHERE = "elsewhere"

# Read once, after the drain: not part of the timed interval.
TALLY = """
SELECT count(*) FILTER (WHERE state = 'completed') AS completed,
       max(finished_at) AS last_finished
FROM instances WHERE sequence_name = %(sequence)s
"""


@dataclass(frozen=True)
class NodeSettings:
    """Flags for one `orch8-supervisor`; None leaves orch8's own default."""

    workers: int = 2
    batch_size: int | None = None
    tick_interval_ms: int | None = None
    max_in_flight: int | None = None

    def arguments(self) -> list[str]:
        found = ["--workers", str(self.workers)]
        for flag, value in (("--batch-size", self.batch_size),
                            ("--tick-interval-ms", self.tick_interval_ms),
                            ("--max-in-flight", self.max_in_flight)):
            if value is not None:
                found += [flag, str(value)]
        return found

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def clean_environ() -> dict[str, str]:
    """This process's environment without orch8's own settings (`ORCH8_*`): what a node
    or a tool started from the bench is given on top of it is all it is told."""
    return {key: value for key, value in os.environ.items() if not key.startswith("ORCH8_")}


class Node:
    """One real `orch8-supervisor` on `dsn`, with the bench's handlers loaded, running the
    code of the source tree `root` (this one unless told), started from that directory."""

    def __init__(self, dsn: str, settings: NodeSettings, root: Path = ROOT) -> None:
        self.dsn = dsn
        self.settings = settings
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = tempfile.TemporaryFile()
        environ = clean_environ()
        environ.update(DATABASE_URL=dsn, ORCH8_LOG_LEVEL="WARNING",
                       ORCH8_HANDLERS="bench.handlers",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(root),
                                                                os.environ.get("PYTHONPATH")])))
        self._process = subprocess.Popen(
            [SUPERVISOR, *settings.arguments(), "--bind", self.url.removeprefix("http://")],
            env=environ, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            # (A tree from before the supervisor passed its import path to its workers'
            # forkserver has them import from the working directory.)
            cwd=root)

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Until `/health/ready` answers 200 (a worker up; with the backlogs here, written
        while the node boots, every worker of it was listening by then in 8 of 8 drains
        of 5,000 checked); a node that exits is an error."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"orch8-supervisor exited with {self._process.returncode}: "
                                       f"{self._output()}")
                try:
                    if http.get("/health/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"orch8-supervisor not ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM (a drain: nothing is in flight by now), then wait; SIGKILL if it hangs."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def _output(self) -> str:
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"


@contextmanager
def started(dsn: str, settings: NodeSettings, count: int = 1,
            root: Path = ROOT) -> Iterator[list[Node]]:
    """`count` nodes on `dsn` (of the source tree `root`), started now and stopped on
    exit. They boot while the caller goes on (inserting a backlog, say); `ready(nodes)`
    waits for them."""
    with ExitStack() as stack:
        nodes = []
        for _ in range(count):
            nodes.append(Node(dsn, settings, root))
            stack.callback(nodes[-1].stop)
        yield nodes


def ready(nodes: Sequence[Node]) -> None:
    for node in nodes:
        node.wait_ready()


class Backlog:
    """`count` instances of `sequence` inserted through `orch8.enqueue_many` in one
    transaction that stays open until `release()`, so that none of them is visible before
    it."""

    def __init__(self, dsn: str, sequence: str, count: int,
                 body: dict[str, Any] | None = None) -> None:
        self.sequence = sequence
        self.count = count
        self._conn = psycopg.connect(dsn)
        request = {"sequence": sequence, "input": body or {}}
        for start in range(0, count, MAX_BATCH):
            enqueue_many(self._conn, [request] * min(MAX_BATCH, count - start))

    def release(self) -> datetime:
        """Commit (with a wake-up NOTIFY); return the database's time just before it."""
        with self._conn:
            self._conn.execute("SELECT pg_notify('orch8_work', '')")
            return commit_stamped(self._conn)


class Watch:
    """The probe of a drain's end (`DRAINING`, every 20 ms), on a session started and
    probed once before the backlog is released. Started after the release, that
    session's start (a new server process, its caches filled, the probe's first plan:
    4.6-8.5 ms for the first probe, about 1 for each one after it) fell inside the drain
    it times, a cost that the raw loop's and pgqueuer's in-process counters do not have."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True)
        self.drained()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()

    def drained(self, priority: int = NORMAL) -> bool:
        """Whether nothing due at `priority` is scheduled or running now."""
        row = self._conn.execute(DRAINING, {"priority": priority,
                                            "elsewhere": ELSEWHERE}).fetchone()
        return row is not None and not row[0]

    def tally(self, sequence: str) -> tuple[int, datetime | None]:
        """How many instances of `sequence` completed, and the last one's `finished_at`."""
        row = self._conn.execute(TALLY, {"sequence": sequence}).fetchone()
        return (row[0], row[1]) if row else (0, None)

    def wait(self, timeout_s: float, priority: int = NORMAL) -> bool:
        """Probe every 20 ms until `drained`; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.drained(priority):
                return True
            time.sleep(0.02)
        return False


def wait_drained(dsn: str, timeout_s: float, priority: int = NORMAL) -> bool:
    """`Watch.wait` on a session of its own, for work that is not timed from a release."""
    with Watch(dsn) as watch:
        return watch.wait(timeout_s, priority)


def finish(watch: Watch, backlog: Backlog, released: datetime, timeout_s: float,
           steps: int = 1) -> Figure:
    """Wait for `backlog` to drain (`watch`, started before its release); its rate from
    the release to the last completion."""
    complete = watch.wait(timeout_s)
    completed, last = watch.tally(backlog.sequence)
    seconds = (last - released).total_seconds() if last else float("nan")
    return Figure(count=backlog.count, completed=completed, seconds=seconds,
                  complete=complete and completed == backlog.count, steps=steps)


def drain(dsn: str, settings: NodeSettings, count: int, *, nodes: int = 1,
          steps: Sequence[dict[str, Any]] = NOOP, timeout_s: float = 300) -> Figure:
    """Boot `nodes` supervisors while a backlog is inserted, release it, time the drain."""
    sequence = new_sequence(dsn, steps)
    with started(dsn, settings, nodes) as booting, Watch(dsn) as watch:
        backlog = Backlog(dsn, sequence, count)
        ready(booting)
        released = backlog.release()
        return finish(watch, backlog, released, timeout_s, steps=len(steps))


def drain_running(dsn: str, count: int, steps: Sequence[dict[str, Any]] = NOOP,
                  timeout_s: float = 300) -> Figure:
    """The same drain, given to nodes already running on `dsn`."""
    with Watch(dsn) as watch:
        backlog = Backlog(dsn, new_sequence(dsn, steps), count)
        released = backlog.release()
        return finish(watch, backlog, released, timeout_s, steps=len(steps))


def new_sequence(dsn: str, steps: Sequence[dict[str, Any]] = NOOP) -> str:
    """A sequence of its own for each drain, so that its tally counts nothing else."""
    name = f"drain-{next(_SEQUENCES)}"
    with Client(dsn) as client:
        client.create_sequence(name, list(steps))
    return name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
