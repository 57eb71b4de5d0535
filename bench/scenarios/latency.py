"""`latency`: an open-loop load at fixed rates (low, 500/s, and 80 % of the node's drain
rate) on one node per tick interval, with the wake-up NOTIFY on and off, taking turns on
the same node. orch8 sends that NOTIFY from a trigger on every insert into `instances`;
"off" disables that trigger on the scenario's scratch database, so that only the tick
finds new work. Start latency: the enqueue's commit (stamped as it is sent) to the
handler's start (both this host's clock); completion: the commit to `finished_at` (the
database's clock, its offset to this host's measured and removed)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import psycopg
from psycopg import sql

from bench import engine
from bench.cases import DEFAULTS, Context
from bench.engine import NodeSettings
from bench.plots import plain_log_axis, plain_numbers, pyplot
from bench.runs import Run
from orch8 import enqueue

STAMP = [{"id": "stamp", "handler": "bench_stamp", "params": {}}]
LOW_RATE = 20
TICKS_MS = (10, 100, 500)
PERCENTILES = (50, 95, 99)

# The triggers on `instances` whose function sends the wake-up NOTIFY, found by what they
# do rather than by name.
WAKE_UP_TRIGGERS = """
SELECT t.tgname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
WHERE t.tgrelid = 'instances'::regclass AND NOT t.tgisinternal
  AND p.prosrc LIKE '%orch8_work%'
"""

# Read once per phase, after it drained.
OUTCOMES = """
SELECT i.id, (o.output ->> 'started_at')::float8, extract(epoch FROM i.finished_at)::float8
FROM instances i JOIN step_outputs o ON o.instance_id = i.id
WHERE i.sequence_name = %(sequence)s
"""


def measure(context: Context) -> Run:
    ticks = (DEFAULTS.tick_interval_ms,) if context.quick else TICKS_MS
    seconds = {"low": context.size(4, 2), "high": context.size(2, 1)}
    run = Run("latency", context.reps, settings={"phase_seconds": seconds, "ticks_ms": ticks})
    for tick in ticks:
        with context.server.database() as dsn:
            with engine.started(dsn, NodeSettings(workers=2, tick_interval_ms=tick)) as nodes:
                engine.ready(nodes)
                rates = [LOW_RATE]
                if tick == DEFAULTS.tick_interval_ms:
                    saturation = engine.drain_running(dsn, context.size(4000, 400), STAMP).per_s
                    run.settings["drain_per_s"] = saturation
                    rates += [500, max(LOW_RATE, int(0.8 * saturation))]
                for rep in range(context.reps):
                    for rate in rates:
                        for notify in (True, False):
                            phase = seconds["low" if rate == LOW_RATE else "high"]
                            _phase(run, rep, dsn, tick, rate, notify, phase)
    run.summary = summarise(run, ticks)
    return run


def _phase(run: Run, rep: int, dsn: str, tick: int, rate: int, notify: bool,
           seconds: float) -> None:
    sequence = engine.new_sequence(dsn, STAMP)
    run.settings["wake_up_triggers"] = switch_wake_up(dsn, notify)
    committed = open_loop(dsn, sequence, rate, seconds)
    engine.wait_drained(dsn, timeout_s=300)
    start_ms, done_ms = _latencies(dsn, sequence, committed)
    where = {"tick_interval_ms": tick, "rate_per_s": rate, "notify": notify,
             "samples": len(start_ms)}
    for name, values in (("start", start_ms), ("completion", done_ms)):
        for pct in PERCENTILES:
            run.add(_label(tick, rate, notify, name, pct), rep, percentile(values, pct),
                    measure=name, percentile=pct, **where)


def _label(tick: int, rate: int, notify: bool, name: str, pct: int) -> str:
    return (f"tick {tick} ms, {rate}/s, NOTIFY {'on' if notify else 'off'}: "
            f"{name} p{pct} (ms)")


def switch_wake_up(dsn: str, on: bool) -> list[str]:
    """Enable or disable the wake-up trigger(s); returns their names."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = [row[0] for row in conn.execute(WAKE_UP_TRIGGERS)]
        for name in names:
            conn.execute(sql.SQL("ALTER TABLE instances {} TRIGGER {}").format(
                sql.SQL("ENABLE" if on else "DISABLE"), sql.Identifier(name)))
    return names


def open_loop(dsn: str, sequence: str, rate: float, seconds: float) -> dict[str, float]:
    """Enqueue at `rate` per second by the clock, whatever the node does (open loop):
    what fell due since the last commit goes in one transaction. Returns id -> commit."""
    total, committed = max(1, int(rate * seconds)), {}
    with psycopg.connect(dsn) as conn:
        begun, sent = time.perf_counter(), 0
        while sent < total:
            due = min(total, int((time.perf_counter() - begun) * rate) + 1)
            if due <= sent:
                time.sleep(max(0.0, begun + sent / rate - time.perf_counter()))
                continue
            ids = [str(enqueue(conn, sequence).id) for _ in range(due - sent)]
            # Stamped as the commit is sent: the rows become visible during the commit, so
            # a latency is never negative (and at most the commit's own time too long).
            stamp = time.time()
            conn.commit()
            committed.update((instance, stamp) for instance in ids)
            sent = due
    return committed


def _latencies(dsn: str, sequence: str,
               committed: dict[str, float]) -> tuple[list[float], list[float]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        offset = clock_offset(conn)
        rows = conn.execute(OUTCOMES, {"sequence": sequence}).fetchall()
    start = [(began - committed[str(instance)]) * 1000 for instance, began, _ in rows]
    done = [(finished - offset - committed[str(instance)]) * 1000
            for instance, _, finished in rows]
    return start, done


def clock_offset(conn: psycopg.Connection[Any]) -> float:
    """The database clock minus this host's, from the fastest of a few round trips."""
    samples = []
    for _ in range(5):
        before = time.time()
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        after = time.time()
        assert row is not None
        samples.append((after - before, row[0] - (before + after) / 2))
    return min(samples)[1]


def percentile(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def summarise(run: Run, ticks: tuple[int, ...]) -> dict[str, Any]:
    default = DEFAULTS.tick_interval_ms
    summary: dict[str, Any] = {
        f"p{pct}_ms": run.stats(_label(default, LOW_RATE, False, "start", pct))["median"]
        for pct in PERCENTILES}
    summary.update({
        f"completion_p{pct}_ms": run.stats(_label(default, LOW_RATE, False, "completion",
                                                  pct))["median"] for pct in PERCENTILES})
    for notify, name in ((False, "without"), (True, "with")):
        for pct in (50, 95):
            summary[f"start_p{pct}_ms_by_tick_{name}_notify"] = {
                str(tick): run.stats(_label(tick, LOW_RATE, notify, "start", pct))["median"]
                for tick in ticks}
    return summary


def plot(run: Run) -> list[tuple[str, Any]]:
    """Start-latency percentiles against rate, one panel per NOTIFY setting."""
    figure, panels = pyplot.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    measured = sorted({r["rate_per_s"] for r in run.records})
    for panel, notify in zip(panels, (True, False), strict=True):
        lines: dict[tuple[int, int], dict[int, float]] = {}
        for label in run.labels():
            record = next(r for r in run.records if r["label"] == label)
            median = run.stats(label)["median"]
            if record["measure"] != "start" or record["notify"] != notify or median is None:
                continue
            key = (record["tick_interval_ms"], record["percentile"])
            lines.setdefault(key, {})[record["rate_per_s"]] = median
        for (tick, pct), points in sorted(lines.items()):
            rates = sorted(points)
            panel.plot(rates, [points[r] for r in rates], marker="o",
                       label=f"tick {tick} ms, p{pct}")
        panel.set_xscale("log")
        panel.set_yscale("log")
        plain_log_axis(panel.xaxis, measured)
        plain_numbers(panel.yaxis)
        panel.set_xlabel("offered rate (instances/s)")
        panel.set_title(f"wake-up NOTIFY {'on' if notify else 'off (tick only)'}")
        panel.legend(fontsize=7)
    panels[0].set_ylabel("commit to handler start (ms, median of repetitions)")
    return [("latency", figure)]
