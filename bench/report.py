"""What a run leaves behind: one JSON document, its Markdown tables, PNG plots, and the
recommended batch size and tick interval for the machine it ran on."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from bench.plots import pyplot
from bench.runs import Run
from bench.scenarios import SCENARIOS

# A batch size within this share of the best rate counts as just as fast; the smallest
# such batch is recommended (less work held by a node that dies, shorter claims).
AS_FAST = 0.95
# The recommended tick is the largest whose median start latency at the lowest rate, with
# the wake-up NOTIFY off, stays under this. Work that falls due later (delays, retries,
# run_at) sends no NOTIFY, so the tick is how late it may start; each tick costs an idle
# worker one claim query.
LATENCY_BUDGET_MS = 100.0


def document(runs: dict[str, Run], facts: dict[str, Any], *, command: str,
             started: datetime, seconds: float, quick: bool,
             pending: list[str]) -> dict[str, Any]:
    return {
        "command": command, "started": started.isoformat(), "seconds": seconds,
        "quick": quick, "pending": pending, "load_average": os.getloadavg(), **facts,
        "summary": {name: run.summary for name, run in runs.items()},
        "recommendation": recommend(runs),
        "scenarios": {name: run.as_json() for name, run in runs.items()},
    }


def write(document: dict[str, Any], runs: dict[str, Run], out: Path, name: str) -> list[Path]:
    """The JSON, Markdown and PNG files of one run; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{name}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2
                                      | orjson.OPT_SERIALIZE_NUMPY))
    figures = []
    for scenario, run in runs.items():
        for plot_name, figure in SCENARIOS[scenario].plot(run):
            path = out / f"bench-{name}-{plot_name}.png"
            figure.savefig(path, dpi=110, bbox_inches="tight")
            pyplot.close(figure)
            figures.append(path)
    paths[1].write_text(markdown(document, [path.name for path in figures]))
    return paths + figures


def markdown(document: dict[str, Any], plots: list[str]) -> str:
    postgresql, machine = document["postgresql"], document["machine"]
    lines = [f"# `{document['command']}`", "",
             f"Started {document['started']}, took {document['seconds']:.0f} s"
             f"{' (quick: small sizes, for checking only)' if document['quick'] else ''}. "
             f"PostgreSQL {postgresql.get('version')} "
             f"({'embedded' if postgresql.get('embedded') else 'DATABASE_URL'}, "
             f"shared_buffers {postgresql.get('shared_buffers')}, synchronous_commit "
             f"{postgresql.get('synchronous_commit')}), {machine['cores']} cores, "
             f"Python {machine['python']}.", "",
             *([f"Not measured yet (the run was still going): {', '.join(document['pending'])}.",
                ""] if document["pending"] else []),
             "## Recommendation", "", recommendation_text(document["recommendation"]), ""]
    for name, scenario in document["scenarios"].items():
        lines += [f"## {name}", "", *_table(scenario), ""]
        if scenario["summary"]:
            lines += ["Summary: `" + orjson.dumps(scenario["summary"]).decode() + "`", ""]
    lines += [f"![{plot}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


def _table(scenario: dict[str, Any]) -> list[str]:
    loads: dict[str, list[float]] = {}
    for record in scenario["records"]:
        loads.setdefault(record["label"], []).append(record["load_1m"])
    rows = ["| case | median | min | max | runs | load (1 min) |",
            "| --- | ---: | ---: | ---: | ---: | --- |"]
    for label, stats in scenario["stats"].items():
        if stats["n"] == 0:
            rows.append(f"| {label} | unfinished | | | 0 | |")
            continue
        found = loads[label]
        rows.append(f"| {label} | {stats['median']:,.1f} | {stats['min']:,.1f} | "
                    f"{stats['max']:,.1f} | {stats['n']} | {min(found):.2f}–{max(found):.2f} |")
    return rows


def recommend(runs: dict[str, Run]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "throughput" in runs:
        found.update(_batch(runs["throughput"]))
    if "latency" in runs:
        found.update(_tick(runs["latency"]))
    return found


def _batch(run: Run) -> dict[str, Any]:
    best: dict[int, float] = {}
    for label in run.labels():
        record = next(r for r in run.records if r["label"] == label)
        median = run.stats(label)["median"]
        if record["system"] == "orch8" and record["workers"] == 2 and median is not None:
            best[record["batch_size"]] = max(best.get(record["batch_size"], 0.0), median)
    if not best:
        return {}
    top = max(best.values())
    batch = min(size for size, rate in best.items() if rate >= AS_FAST * top)
    return {"batch_size": batch, "max_in_flight": 2 * batch,
            "batch_rule": f"smallest batch within {AS_FAST:.0%} of the best rate "
                          f"({top:,.0f}/s, 2 workers)",
            "batch_rates": {str(size): rate for size, rate in sorted(best.items())}}


def _tick(run: Run) -> dict[str, Any]:
    p50 = run.summary.get("start_p50_ms_by_tick_without_notify", {})
    fitting = [int(tick) for tick, value in p50.items()
               if value is not None and value <= LATENCY_BUDGET_MS]
    if not fitting:
        return {}
    return {"tick_interval_ms": max(fitting),
            "tick_rule": f"largest tick whose median start latency at the lowest rate, with "
                         f"the wake-up NOTIFY off, is under {LATENCY_BUDGET_MS:.0f} ms",
            "tick_p50_ms": p50}


def recommendation_text(found: dict[str, Any]) -> str:
    parts = []
    if "batch_size" in found:
        parts.append(f"ORCH8_BATCH_SIZE={found['batch_size']} "
                     f"ORCH8_MAX_IN_FLIGHT={found['max_in_flight']} ({found['batch_rule']})")
    if "tick_interval_ms" in found:
        parts.append(f"ORCH8_TICK_INTERVAL_MS={found['tick_interval_ms']} "
                     f"({found['tick_rule']})")
    if not parts:
        return "Recommendation: none from this scenario (run throughput and latency)."
    return "Recommendation for this machine: " + "; ".join(parts) + "."
