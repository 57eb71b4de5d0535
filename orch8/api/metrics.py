"""`GET /metrics`: the node's Prometheus metrics, built with `prometheus_client`.

Each node gets a `CollectorRegistry` of its own (never the library's global one), so
two apps in one process, as in tests, never share or double-register a metric.

Counters are summed at each scrape from the node's metrics directory, where every
process of the node (the supervisor and each worker, live or dead) writes its counts as it
counts (`orch8.engine.stats`): a worker killed with SIGKILL loses none, and a respawned
worker's new file adds to its predecessor's, so the node's counters only ever rise.
Histograms are fed by the workers' reports, which carry their observations already folded
into the buckets (`FoldedHistogram` adds them up). Gauges are read when Prometheus
scrapes: the queue depth with one cheap query, the rest from the node view.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orch8.api.node import NodeView, WorkerReport
from orch8.engine.stats import LATENESS_BUCKETS, STEP_BUCKETS, Folded
from orch8.model import Priority
from orch8.store.instances import queue_depth

log = logging.getLogger("orch8.metrics")

NODE_STATES = ("active", "draining", "stopping")
QUEUE_TIMEOUT_S = 2.0


class NodeMetrics:
    """The node's registry: counters from its metrics directory, histograms from worker
    reports, gauges refreshed at each scrape."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(CountFiles(node.metrics_dir))
        self.step_seconds = FoldedHistogram(
            "orch8_step_duration_seconds", "Time a step handler ran.", STEP_BUCKETS)
        self.claim_latency = FoldedHistogram(
            "orch8_claim_latency_seconds", "Time from an instance falling due to its claim.",
            LATENESS_BUCKETS)
        self.registry.register(self.step_seconds)
        self.registry.register(self.claim_latency)
        self.queue_depth = Gauge(
            "orch8_queue_depth", "Scheduled instances already due, by priority.",
            ["priority"], registry=self.registry)
        self.in_flight = Gauge("orch8_in_flight", "Steps running now on this node.",
                               registry=self.registry)
        self.workers_alive = Gauge("orch8_workers_alive", "Worker processes alive.",
                                   registry=self.registry)
        self.node_state = Gauge("orch8_node_state", "1 for the node's current state.",
                                ["state"], registry=self.registry)
        for report in node.reports():
            self.record(report)
        node.add_report_listener(self.record)

    def record(self, report: WorkerReport) -> None:
        """Add one report's histogram observations (its counts are already on file)."""
        self.step_seconds.add(report.step_seconds)
        self.claim_latency.add(report.claim_lateness_seconds)

    async def refresh(self) -> None:
        """Update the gauges read at scrape time."""
        reports = self.node.reports()
        self.in_flight.set(sum(report.in_flight for report in reports if report.alive))
        self.workers_alive.set(sum(1 for report in reports if report.alive))
        current = self.node.state()
        for state in NODE_STATES:
            self.node_state.labels(state=state).set(1 if state == current else 0)
        try:
            async with self.node.pool.connection(timeout=QUEUE_TIMEOUT_S) as conn:
                depth = await queue_depth().run_async(conn)
        except Exception as error:  # the scrape still answers; the depth is left as it was
            log.warning("metrics: could not read the queue depth: %s", type(error).__name__)
            return
        for priority in Priority:
            name = priority.name.lower()
            self.queue_depth.labels(priority=name).set(depth.get(name, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FoldedHistogram:
    """A histogram whose observations arrive folded into its buckets (`Folded`)."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def add(self, folded: Folded) -> None:
        if len(folded.counts) != len(self.counts):
            if folded.counts:  # an empty one is a report with nothing observed
                log.warning("metrics: a report's %s has %d buckets, not %d; ignored",
                            self.name, len(folded.counts), len(self.counts))
            return
        for bucket, count in enumerate(folded.counts):
            self.counts[bucket] += count
        self.sum += folded.sum

    def collect(self) -> Iterable[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                    sum_value=self.sum)


class CountFiles:
    """The counters: the sum of every process's count file (prometheus_client's format).

    A file is empty for the instant between its creation and its sizing; it holds no count
    yet, and reading it would fail, so it is skipped.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in self.directory.glob("*.db"):
            try:
                if path.stat().st_size > 0:
                    files.append(str(path))
            except FileNotFoundError:
                continue
        metrics: Iterable[Metric] = MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
            files, accumulate=True)
        return metrics


def metrics_route(node: NodeView) -> Route:
    """`GET /metrics` for this node."""
    metrics = NodeMetrics(node)

    async def endpoint(request: Request) -> Response:
        await metrics.refresh()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", endpoint, methods=["GET"])
