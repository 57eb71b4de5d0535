"""`/metrics` after real work on a running node, and the counters across worker restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import psycopg
import pytest
from api_helpers import Node, command_line, database, descendants, running_node, wait_for
from handlers_for_tests import EXECUTIONS_TABLE
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from orch8 import Client
from orch8.api.metrics import NodeMetrics
from orch8.api.node import ReportListener, WorkerReport
from orch8.config import Settings
from orch8.engine.stats import LATENESS_BUCKETS, METRICS_DIR_VARIABLE, STEP_BUCKETS, Folded, Folding

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def eventually(check: Callable[[], Samples], condition: Callable[[Samples], bool],
               timeout_s: float = 20.0) -> Samples:
    """Reports arrive every interval: scrape until the numbers have caught up."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = check()
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.fixture(scope="module")
def node(server_dsn: str, template_name: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with database(server_dsn, template_name) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(EXECUTIONS_TABLE)
        with running_node(dsn, tmp_path_factory.mktemp("metrics"), ORCH8_WORKERS="2",
                          ORCH8_HANDLERS="handlers_for_tests",
                          PYTHONPATH=str(Path(__file__).parent)) as node:
            yield node


def run_batch(client: httpx.Client, plain: int, doomed: int, flaky: int) -> list[str]:
    """Start a batch: two-step successes, failures without retry, failures retried once."""
    bodies = ([{"sequence": "two-steps"}] * plain + [{"sequence": "doomed"}] * doomed
              + [{"sequence": "flaky"}] * flaky)
    created = client.post("/instances/batch", json={"instances": bodies})
    assert created.status_code == 201, created.text
    ids = [item["id"] for item in created.json()["instances"]]
    for instance_id in ids:
        wait_for(client, instance_id)
    return ids


def test_metrics_match_what_ran(node: Node) -> None:
    with node.client() as client:
        for name, steps in {
            "two-steps": [{"id": "a", "handler": "noop"}, {"id": "b", "handler": "noop"}],
            "doomed": [{"id": "a", "handler": "fail", "params": {"retryable": False}}],
            "flaky": [{"id": "a", "handler": "fail", "retry": {
                "max_attempts": 2, "initial_backoff_ms": 10, "max_backoff_ms": 10}}],
            # `record` writes a row as it starts: the test kills the worker only then.
            "nap": [{"id": "a", "handler": "record", "params": {"ms": 600_000}}],
        }.items():
            assert client.post("/sequences", json={"name": name, "steps": steps}
                               ).status_code == 201
        run_batch(client, plain=20, doomed=3, flaky=2)
        states = [item["state"] for item in client.get("/instances").json()["instances"]]
        assert sorted(states) == ["completed"] * 20 + ["failed"] * 5
        # Counts are on file at once; histogram samples come with the next reports.
        samples = eventually(lambda: scrape(client), lambda s: value(
            s, "orch8_step_duration_seconds_count") >= 47 and value(
            s, "orch8_claim_latency_seconds_count") >= 27)
        # 20 x 2 steps + 3 single failures + 2 x 2 attempts
        assert value(samples, "orch8_steps_executed_total") == 47
        assert value(samples, "orch8_step_duration_seconds_count") == 47
        assert value(samples, "orch8_instances_completed_total") == 20
        assert value(samples, "orch8_instances_failed_total") == 5
        assert value(samples, "orch8_steps_retried_total") == 2
        # each flaky instance is claimed twice: once per attempt
        assert value(samples, "orch8_instances_claimed_total") == 27
        assert value(samples, "orch8_claim_latency_seconds_count") == 27
        assert value(samples, "orch8_fenced_writes_rejected_total") == 0
        assert value(samples, "orch8_queue_depth", priority="normal") == 0
        assert value(samples, "orch8_in_flight") == 0
        assert value(samples, "orch8_workers_alive") == 2
        assert value(samples, "orch8_node_state", state="active") == 1
        assert value(samples, "orch8_node_state", state="draining") == 0

        # Workers killed the moment their last instance completes keep every count they
        # made (their last report was never sent); respawned ones add to the same totals.
        run_batch(client, plain=40, doomed=0, flaky=0)
        victims = worker_pids(node)
        for victim in victims:
            os.kill(victim, signal.SIGKILL)
        eventually(lambda: scrape(client), lambda s: value(s, "orch8_workers_alive") == 2
                   and not set(victims) & set(worker_pids(node)))
        after = scrape(client)
        assert value(after, "orch8_instances_completed_total") == 60
        assert value(after, "orch8_steps_executed_total") == 127
        assert value(after, "orch8_instances_failed_total") == 5

        # The supervisor settles a killed worker's claims and counts what it did: the step
        # that was running is charged an attempt, and with no retry policy that fails it.
        failed = value(after, "orch8_instances_failed_total")
        created = client.post("/instances", json={"sequence": "nap"})
        assert created.status_code == 201, created.text
        nap = created.json()["id"]
        assert eventually(lambda: executions(node, nap), bool)  # type: ignore[arg-type]
        # The worker that runs it, by the pid its handler wrote (not by a process listing,
        # which can miss a worker that has just been restarted).
        os.kill(executor_pid(node, nap), signal.SIGKILL)
        late = eventually(lambda: scrape(client), lambda s: value(
            s, "orch8_instances_failed_total") > failed)
        assert value(late, "orch8_instances_failed_total") == failed + 1
        assert value(late, "orch8_worker_deaths_total") >= 1
        settled = wait_for(client, nap, states=("failed",))
        assert "killed by SIGKILL" in settled["last_error"]


def executions(node: Node, instance_id: str) -> int:
    with psycopg.connect(node.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM test_executions WHERE instance_id = %s",
                           (instance_id,)).fetchone()
    return int(row[0]) if row else 0


def executor_pid(node: Node, instance_id: str) -> int:
    with psycopg.connect(node.dsn) as conn:
        row = conn.execute("SELECT pid FROM test_executions WHERE instance_id = %s",
                           (instance_id,)).fetchone()
    assert row is not None
    return int(row[0])


def worker_pids(node: Node) -> list[int]:
    return [pid for pid in descendants(node.process.pid)
            if command_line(pid).startswith("orch8 worker")]


class ReportingNode:
    """A node view whose reports the test sends (no pool: the gauges are not refreshed)."""

    node_id = "unit"
    settings = Settings()
    def __init__(self, metrics_dir: str, pool: AsyncConnectionPool | None = None) -> None:
        self.metrics_dir = metrics_dir
        self.pool = pool
        self.listeners: list[ReportListener] = []
        self.latest: dict[int, WorkerReport] = {}

    def state(self) -> str:
        return "active"

    def is_ready(self) -> bool:
        return True

    def unready_reason(self) -> str:
        return "ready"

    def reports(self) -> list[WorkerReport]:
        return list(self.latest.values())

    def add_report_listener(self, listener: ReportListener) -> None:
        self.listeners.append(listener)

    def send(self, report: WorkerReport) -> None:
        self.latest[report.slot] = report
        for listener in self.listeners:
            listener(report)


COUNT_THEN_HANG = """
import sys
from orch8.engine.stats import process_stats
stats = process_stats()
stats.add("completed", int(sys.argv[1]))
stats.add("released")
print("counted", flush=True)
sys.stdin.read()
"""


def test_counts_of_killed_processes_are_kept(tmp_path: Path) -> None:
    """Each process's counts are on file the moment it counts; SIGKILL takes none away."""
    environ = {**os.environ, METRICS_DIR_VARIABLE: str(tmp_path)}
    for completed in (4, 6):
        with subprocess.Popen([sys.executable, "-c", COUNT_THEN_HANG, str(completed)],
                              env=environ, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) as process:
            assert process.stdout is not None and process.stdout.readline() == b"counted\n"
            process.kill()
            assert process.wait() == -signal.SIGKILL
    metrics = NodeMetrics(ReportingNode(str(tmp_path)))  # type: ignore[arg-type]
    assert metrics.registry.get_sample_value("orch8_instances_completed_total") == 10
    assert metrics.registry.get_sample_value("orch8_instances_released_total") == 2
    assert metrics.registry.get_sample_value("orch8_fenced_writes_rejected_total") == 0


def folded(bounds: tuple[float, ...], *values: float) -> Folded:
    """`values` folded into the buckets of `bounds`, as a worker's report carries them."""
    folding = Folding(bounds)
    for value in values:
        folding.observe(value)
    return folding.take()


def test_histograms_come_from_reports(tmp_path: Path) -> None:
    node = ReportingNode(str(tmp_path))
    steps = partial(folded, STEP_BUCKETS)
    node.latest[1] = WorkerReport(1, 100, True, step_seconds=steps(0.5))  # before the app existed
    metrics = NodeMetrics(node)  # type: ignore[arg-type]
    node.send(WorkerReport(1, 100, True, step_seconds=steps(0.01, 0.02)))
    node.send(WorkerReport(2, 200, True,
                           claim_lateness_seconds=folded(LATENESS_BUCKETS, 0.3)))
    assert metrics.registry.get_sample_value("orch8_step_duration_seconds_count") == 3
    assert metrics.registry.get_sample_value("orch8_claim_latency_seconds_count") == 1
    # The buckets are cumulative, as Prometheus reads them; a value on a bound is in it.
    step_bucket = partial(metrics.registry.get_sample_value, "orch8_step_duration_seconds_bucket")
    assert [step_bucket({"le": le}) for le in ("0.005", "0.01", "0.025", "0.5", "+Inf")] == [
        0, 1, 2, 3, 3]
    assert metrics.registry.get_sample_value("orch8_step_duration_seconds_sum") == pytest.approx(
        0.53)


def test_observations_are_folded_into_buckets_and_taken_once() -> None:
    folding = Folding((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0, 9.0):
        folding.observe(value)
    taken = folding.take()
    assert taken.counts == (2, 2, 2) and taken.sum == pytest.approx(17.65)
    assert folding.take() == Folded((0, 0, 0), 0.0)


@given(st.lists(st.one_of(st.sampled_from((0.0, 0.1, 1.0)),
                          st.floats(0, 20, allow_nan=False)), max_size=150))
def test_a_batch_is_folded_as_its_values_one_by_one(values: list[float]) -> None:
    """`observe_each` (sorted, one bisect per bucket) buckets as `observe` does, values
    equal to a bound included."""
    one_by_one, at_once = Folding((0.1, 1.0, 5.0)), Folding((0.1, 1.0, 5.0))
    for value in values:
        one_by_one.observe(value)
    at_once.observe_each(iter(values))
    expected, taken = one_by_one.take(), at_once.take()
    assert taken.counts == expected.counts
    assert taken.sum == pytest.approx(expected.sum)


def test_a_report_whose_buckets_do_not_match_is_ignored(tmp_path: Path) -> None:
    node = ReportingNode(str(tmp_path))
    metrics = NodeMetrics(node)  # type: ignore[arg-type]
    node.send(WorkerReport(1, 100, True, step_seconds=Folded((1, 2), 0.5)))
    node.send(WorkerReport(1, 100, True, step_seconds=folded(STEP_BUCKETS, 0.5)))
    assert metrics.registry.get_sample_value("orch8_step_duration_seconds_count") == 1


def test_gauges_read_at_scrape_time(dsn: str, tmp_path: Path) -> None:
    """The queue depth comes from the database when scraped (no workers here to drain it)."""
    with Client(dsn) as client:
        client.create_sequence("queued", [{"id": "a", "handler": "noop"}])
        for priority in ("low", "high", "high"):
            client.start("queued", priority=priority)
        client.start("queued", delay_ms=3_600_000)  # not due yet

    async def scrape_once() -> NodeMetrics:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
            node = ReportingNode(str(tmp_path), pool)
            metrics = NodeMetrics(node)  # type: ignore[arg-type]
            node.send(WorkerReport(1, 100, True, {}, in_flight=3))
            node.send(WorkerReport(2, 200, False, {}, in_flight=9))  # dead: not counted
            await metrics.refresh()
            return metrics

    registry = asyncio.run(scrape_once()).registry
    depth = {priority: registry.get_sample_value("orch8_queue_depth", {"priority": priority})
             for priority in ("low", "normal", "high", "critical")}
    assert depth == {"low": 1, "normal": 0, "high": 2, "critical": 0}
    assert registry.get_sample_value("orch8_in_flight") == 3
    assert registry.get_sample_value("orch8_workers_alive") == 1
    assert registry.get_sample_value("orch8_node_state", {"state": "active"}) == 1
