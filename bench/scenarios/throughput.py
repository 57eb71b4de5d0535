"""`throughput`: drain a backlog of one-step `noop` instances (outputs recorded) over a grid
of batch size x tick interval x workers per node, beside the raw loop (orch8's default
batch, 2 processes), orch8's own claim and finish statements in the same minimal loop
(`bench.own_sql`: the raw loop's rate over it is the price of the schema and statements,
its rate over the node's the price of the engine) and pgqueuer (batch 1000, 2 consumers),
all interleaved.

With a backlog a worker claims again as soon as half a batch of slots is free, so the tick
matters little here; it is measured across more values by `latency`, where it decides."""

from __future__ import annotations

from typing import Any

from bench.cases import (
    DEFAULTS,
    Context,
    node_settings,
    orch8_case,
    own_sql_case,
    pgqueuer_case,
    raw_case,
)
from bench.engine import NodeSettings
from bench.plots import plain_log_axis, pyplot
from bench.runs import Run, interleave

BATCHES = (10, 50, 200, 500)  # at the default tick, 2 workers
TICKS_MS = (10, 500)  # besides the default, at batch 50 and 200, 2 workers
DEFAULT_LABEL = "orch8 defaults, 2 workers"
RAW_LABEL = f"raw loop batch {DEFAULTS.batch_size}, 2 processes"
OWN_SQL_LABEL = f"orch8 SQL alone batch {DEFAULTS.batch_size}, 2 processes"
PGQUEUER_LABEL = "pgqueuer batch 1000, 2 consumers"


def grid(quick: bool) -> list[NodeSettings]:
    """Every node configuration measured besides the defaults; in flight twice the batch,
    so that a worker can hold one batch while it claims the next."""
    tick = DEFAULTS.tick_interval_ms
    if quick:
        points = [(2, 200, tick)]
    else:
        points = [(2, batch, tick) for batch in BATCHES]
        points += [(2, batch, other) for batch in (50, 200) for other in TICKS_MS]
        points += [(1, DEFAULTS.batch_size, tick)]
    found = [NodeSettings(workers=workers, batch_size=batch, tick_interval_ms=tick,
                          max_in_flight=2 * batch) for workers, batch, tick in points]
    # The defaults are measured under their own label: do not measure them twice.
    return [settings for settings in found
            if node_settings(settings) != node_settings(NodeSettings(workers=2))]


def measure(context: Context) -> Run:
    count = context.size(5_000, 1_000)
    run = Run("throughput", context.reps, settings={"instances": count})
    cases = [orch8_case(context, NodeSettings(workers=2), count, DEFAULT_LABEL),
             raw_case(context, DEFAULTS.batch_size, 2, count),
             own_sql_case(context, DEFAULTS.batch_size, 2, count),
             pgqueuer_case(context, 1000, 2, count)]
    cases += [orch8_case(context, settings, count) for settings in grid(context.quick)]
    interleave(run, cases)
    run.summary = summarise(run)
    return run


def summarise(run: Run) -> dict[str, float | None]:
    versus_raw = run.ratio(DEFAULT_LABEL, RAW_LABEL)
    versus_peer = run.ratio(DEFAULT_LABEL, PGQUEUER_LABEL)
    sql_versus_raw = run.ratio(OWN_SQL_LABEL, RAW_LABEL)
    versus_sql = run.ratio(DEFAULT_LABEL, OWN_SQL_LABEL)
    return {
        "engine_per_s": run.stats(DEFAULT_LABEL)["median"],
        "raw_per_s": run.stats(RAW_LABEL)["median"],
        "pgqueuer_per_s": run.stats(PGQUEUER_LABEL)["median"],
        "ratio_raw": versus_raw["median"],
        "ratio_raw_min": versus_raw["min"], "ratio_raw_max": versus_raw["max"],
        "ratio_pgqueuer": versus_peer["median"],
        "ratio_pgqueuer_min": versus_peer["min"], "ratio_pgqueuer_max": versus_peer["max"],
        # The gap to the raw loop, split: the schema and statements, then the engine.
        "own_sql_per_s": run.stats(OWN_SQL_LABEL)["median"],
        "ratio_own_sql_raw": sql_versus_raw["median"],
        "ratio_own_sql_raw_min": sql_versus_raw["min"],
        "ratio_own_sql_raw_max": sql_versus_raw["max"],
        "ratio_engine_own_sql": versus_sql["median"],
        "ratio_engine_own_sql_min": versus_sql["min"],
        "ratio_engine_own_sql_max": versus_sql["max"],
    }


def plot(run: Run) -> list[tuple[str, Any]]:
    """Instances/s against batch size, one line per tick interval (and per worker count)."""
    lines: dict[str, dict[int, float]] = {}
    for label in run.labels():
        record = next(r for r in run.records if r["label"] == label)
        median = run.stats(label)["median"]
        if record["system"] != "orch8" or median is None:
            continue
        key = f"tick {record['tick_interval_ms']} ms, {record['workers']} workers"
        lines.setdefault(key, {})[record["batch_size"]] = median
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for key, points in sorted(lines.items()):
        batches = sorted(points)
        axes.plot(batches, [points[b] for b in batches], marker="o", label=key)
    for label, style in ((RAW_LABEL, "--"), (PGQUEUER_LABEL, ":")):
        median = run.stats(label)["median"]
        if median is not None:
            axes.axhline(median, linestyle=style, color="grey", label=label)
    axes.set_xscale("log")
    plain_log_axis(axes.xaxis, [batch for points in lines.values() for batch in points])
    axes.set_xlabel("batch size (instances per claim, per worker)")
    axes.set_ylabel("instances/s (median)")
    axes.set_title("Drain throughput, one-step noop")
    axes.legend(fontsize=7)
    return [("throughput", figure)]
