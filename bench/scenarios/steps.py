"""`steps`: 1-, 3- and 10-step sequences of `noop` steps whose outputs are 100 B or 10 KB,
drained by one node with orch8's defaults and 2 workers; the cost of a step is the
reciprocal of steps per second. The variants take turns within each repetition."""

from __future__ import annotations

from typing import Any

from bench import engine
from bench.cases import Context
from bench.engine import NodeSettings
from bench.runs import Case, Figure, Run, interleave

LENGTHS = (1, 3, 10)
OUTPUT_BYTES = (100, 10_000)


def _steps(length: int, size: int) -> list[dict[str, Any]]:
    # `noop` returns its params, so the padding is the recorded output.
    return [{"id": f"s{n}", "handler": "noop", "params": {"pad": "x" * size}}
            for n in range(length)]


def _label(length: int, size: int) -> str:
    return f"{length} step{'s' if length > 1 else ''}, {size:,} B outputs"


def measure(context: Context) -> Run:
    step_budget = context.size(6_000, 1_200)  # steps per drain, alike for every length
    run = Run("steps", context.reps, settings={"steps_per_drain": step_budget})
    with context.server.database() as dsn:
        with engine.started(dsn, NodeSettings(workers=2)) as nodes:
            engine.ready(nodes)
            cases = []
            for length in LENGTHS:
                for size in OUTPUT_BYTES:
                    steps = _steps(length, size)

                    def measure_one(steps: list[dict[str, Any]] = steps) -> Figure:
                        return engine.drain_running(dsn, step_budget // len(steps), steps)

                    cases.append(Case(_label(length, size), measure_one,
                                      {"length": length, "output_bytes": size}))
            interleave(run, cases)
    run.summary = {}
    for case in cases:
        per_s = run.stats(case.label)["median"]
        length, size = case.settings["length"], case.settings["output_bytes"]
        key = f"{length}_steps_{size}_b"
        run.summary[f"{key}_instances_per_s"] = per_s
        run.summary[f"{key}_us_per_step"] = 1e6 / (per_s * length) if per_s else None
    return run


def plot(run: Run) -> list[tuple[str, Any]]:
    return []
