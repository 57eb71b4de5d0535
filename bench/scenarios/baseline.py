"""`baseline`: orch8 beside the minimal raw loop at the same batch size and process count
(orch8 workers = raw processes), interleaved; the ratio is taken within each repetition."""

from __future__ import annotations

from typing import Any

from bench.cases import Context, orch8_case, raw_case
from bench.engine import NodeSettings
from bench.runs import Run, interleave

PAIRS = ((50, 1), (200, 2))  # (batch size, processes); --quick: the second only


def measure(context: Context) -> Run:
    count = context.size(5_000, 1_000)
    pairs = PAIRS[1:2] if context.quick else PAIRS
    run = Run("baseline", context.reps, settings={"instances": count})
    cases = []
    for batch, processes in pairs:
        settings = NodeSettings(workers=processes, batch_size=batch, max_in_flight=2 * batch)
        cases += [orch8_case(context, settings, count), raw_case(context, batch, processes, count)]
    interleave(run, cases)
    run.summary = {f"ratio_raw_batch_{cases[2 * n].settings['batch_size']}_"
                   f"{cases[2 * n].settings['workers']}_processes": _ratio(run, cases, n)
                   for n in range(len(pairs))}
    return run


def _ratio(run: Run, cases: list[Any], pair: int) -> float | None:
    ratio = run.ratio(cases[2 * pair].label, cases[2 * pair + 1].label)
    return ratio["median"]  # type: ignore[no-any-return]


def plot(run: Run) -> list[tuple[str, Any]]:
    return []
