"""`/metrics` after real work on a running node, and the counters across worker restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from api_helpers import Node, command_line, database, descendants, running_node, wait_for
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from orch8 import Client
from orch8.api.metrics import NodeMetrics
from orch8.api.node import ReportListener, WorkerReport
from orch8.config import Settings

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
    with database(server_dsn, template_name) as dsn, running_node(
            dsn, tmp_path_factory.mktemp("metrics"), ORCH8_WORKERS="2") as node:
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
        }.items():
            assert client.post("/sequences", json={"name": name, "steps": steps}
                               ).status_code == 201
        run_batch(client, plain=20, doomed=3, flaky=2)
        states = [item["state"] for item in client.get("/instances").json()["instances"]]
        assert sorted(states) == ["completed"] * 20 + ["failed"] * 5
        samples = eventually(lambda: scrape(client), lambda s: value(
            s, "orch8_steps_executed_total") >= 47)
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

        # A respawned worker counts from zero again; the node's totals only rise.
        victim = worker_pids(node)[0]
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: scrape(client), lambda s: value(s, "orch8_workers_alive") == 2
                   and victim not in worker_pids(node))
        run_batch(client, plain=5, doomed=0, flaky=0)
        after = eventually(lambda: scrape(client), lambda s: value(
            s, "orch8_instances_completed_total") >= 25)
        assert value(after, "orch8_instances_completed_total") == 25
        assert value(after, "orch8_steps_executed_total") == 57
        assert value(after, "orch8_instances_failed_total") == 5


def worker_pids(node: Node) -> list[int]:
    return [pid for pid in descendants(node.process.pid)
            if command_line(pid).startswith("orch8 worker")]


class ReportingNode:
    """A node view whose reports the test sends (no pool: the gauges are not refreshed)."""

    node_id = "unit"
    settings = Settings()
    def __init__(self, pool: AsyncConnectionPool | None = None) -> None:
        self.pool = pool
        self.listeners: list[ReportListener] = []
        self.latest: dict[int, WorkerReport] = {}

    def state(self) -> str:
        return "active"

    def is_ready(self) -> bool:
        return True

    def reports(self) -> list[WorkerReport]:
        return list(self.latest.values())

    def add_report_listener(self, listener: ReportListener) -> None:
        self.listeners.append(listener)

    def send(self, report: WorkerReport) -> None:
        self.latest[report.slot] = report
        for listener in self.listeners:
            listener(report)


def test_counters_survive_restarts_and_repeats() -> None:
    node = ReportingNode()
    node.latest[1] = WorkerReport(1, 100, True, {"completed": 4})  # before the app existed
    metrics = NodeMetrics(node)  # type: ignore[arg-type]
    node.send(WorkerReport(1, 100, True, {"completed": 6}, step_seconds=(0.01, 0.02)))
    node.send(WorkerReport(1, 100, True, {"completed": 6}))  # nothing new
    node.send(WorkerReport(2, 200, True, {"completed": 3}))
    node.send(WorkerReport(1, 101, True, {"completed": 2}))  # slot 1 respawned
    node.send(WorkerReport(1, 101, True, {"completed": 5, "someday": 9}))
    completed = metrics.registry.get_sample_value("orch8_instances_completed_total")
    assert completed == 6 + 3 + 5
    assert metrics.registry.get_sample_value("orch8_step_duration_seconds_count") == 2


def test_gauges_read_at_scrape_time(dsn: str) -> None:
    """The queue depth comes from the database when scraped (no workers here to drain it)."""
    with Client(dsn) as client:
        client.create_sequence("queued", [{"id": "a", "handler": "noop"}])
        for priority in ("low", "high", "high"):
            client.start("queued", priority=priority)
        client.start("queued", delay_ms=3_600_000)  # not due yet

    async def scrape_once() -> NodeMetrics:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False) as pool:
            node = ReportingNode(pool)
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
