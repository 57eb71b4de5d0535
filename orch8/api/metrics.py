"""`GET /metrics`: the node's Prometheus metrics, built with `prometheus_client`.

Each node gets a `CollectorRegistry` of its own (never the library's global one), so
two apps in one process, as in tests, never share or double-register a metric.

Counters come from the workers' reports. A report carries totals since that worker
process started; the node adds the difference from the previous report of the same
process, and a new process id in a slot (a respawned worker) counts from zero again.
So the node's counters only ever rise, across worker restarts. Gauges are read when
Prometheus scrapes: the queue depth with one cheap query, the rest from the node view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orch8.api.node import NodeView, WorkerReport
from orch8.model import Priority
from orch8.store.instances import queue_depth

log = logging.getLogger("orch8.metrics")

# Worker counter -> (metric name without `_total`, help text).
COUNTER_METRICS = {
    "claimed": ("orch8_instances_claimed", "Instances claimed by this node's workers."),
    "steps_executed": ("orch8_steps_executed", "Step handler runs finished (any outcome)."),
    "completed": ("orch8_instances_completed", "Instances that completed."),
    "failed": ("orch8_instances_failed", "Instances that failed (moved to the dead letter)."),
    "retried": ("orch8_steps_retried", "Step attempts that failed and were scheduled again."),
    "delayed": ("orch8_steps_delayed", "Steps put back to wait out their delay_ms."),
    "released": ("orch8_instances_released", "Claims released without finishing a step."),
    "fenced_rejected": ("orch8_fenced_writes_rejected",
                        "Writes refused because the claim had moved on (epoch fence)."),
    "rate_limited": ("orch8_steps_rate_limited",
                     "Steps put back because their handler's rate limit was reached."),
}
NODE_STATES = ("active", "draining", "stopping")
# Steps range from microseconds (noop) to minutes; lateness from milliseconds up.
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class _Seen:
    """The last totals reported by one worker process in a slot."""

    pid: int
    counts: dict[str, int]


class NodeMetrics:
    """The node's registry, fed by worker reports and refreshed at each scrape."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self._seen: dict[int, _Seen] = {}
        self.counters = {
            name: Counter(metric, text, registry=self.registry)
            for name, (metric, text) in COUNTER_METRICS.items()
        }
        self.step_seconds = Histogram(
            "orch8_step_duration_seconds", "Time a step handler ran.",
            buckets=STEP_BUCKETS, registry=self.registry)
        self.claim_latency = Histogram(
            "orch8_claim_latency_seconds", "Time from an instance falling due to its claim.",
            buckets=LATENESS_BUCKETS, registry=self.registry)
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
        """Add one report: counter increases since the same process's last report."""
        previous = self._seen.get(report.slot)
        same_process = previous is not None and previous.pid == report.pid
        before = previous.counts if same_process and previous is not None else {}
        for name, total in report.counts.items():
            counter = self.counters.get(name)
            if counter is None:
                continue
            increase = total - before.get(name, 0)
            if increase < 0:  # should not happen within one process; never go backwards
                increase = total
            if increase > 0:
                counter.inc(increase)
        self._seen[report.slot] = _Seen(report.pid, dict(report.counts))
        for seconds in report.step_seconds:
            self.step_seconds.observe(seconds)
        for seconds in report.claim_lateness_seconds:
            self.claim_latency.observe(seconds)

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


def metrics_route(node: NodeView) -> Route:
    """`GET /metrics` for this node."""
    metrics = NodeMetrics(node)

    async def endpoint(request: Request) -> Response:
        await metrics.refresh()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", endpoint, methods=["GET"])
