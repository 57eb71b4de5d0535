"""How close a saturated concurrency key comes to its ideal rate (cap / step time).

    python bench/key_saturation.py [--runs 3]

Runs the scenario of `tests/test_concurrency_processes.py` (three worker processes; keys
with caps 1, 2 and 3 and unkeyed work, every step 40 ms) on a scratch database and
reports, per key, the most calls seen at once, the rate against the ideal, and for the
cap-1 key the median gap between a slot freeing and its next step starting (commit,
wake-up, claim). Medians with min-max over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
import _common  # noqa: E402

from tests.test_concurrency_processes import (  # noqa: E402
    KEYS,
    STEP_MS,
    most_at_once,
    run_keyed_load,
)


def one_run(server: str) -> dict[str, float]:
    dsn = _common.scratch_database(server)
    try:
        rows = run_keyed_load(dsn)
    finally:
        _common.drop_database(server, dsn)
    figures: dict[str, float] = {}
    for key, (cap, count) in KEYS.items():
        calls = sorted((started, ended) for label, _, started, ended in rows if label == key)
        span = max(end for _, end in calls) - min(start for start, _ in calls)
        figures[f"{key}_peak"] = most_at_once(calls)
        figures[f"{key}_of_ideal_pct"] = 100 * (count / span) / (cap / (STEP_MS / 1000))
        if cap == 1:
            gaps = sorted(b[0] - a[1] for a, b in zip(calls, calls[1:], strict=False))
            figures[f"{key}_next_step_gap_ms"] = 1000 * gaps[len(gaps) // 2]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server = _common.server_dsn()
    runs = []
    for run in range(args.runs):
        runs.append(one_run(server))
        print(f"run {run + 1}: {runs[-1]}", flush=True)
    for key in runs[0]:
        values = [figures[key] for figures in runs]
        print(f"{key}: {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
