"""`python -m bench <scenario> [--quick]`: see README, section Benchmarks.

Progress goes to stderr; stdout carries the recommendation and, as its last line, one
JSON object with the scenario's summary. Files: `<out>/bench-<scenario>.json` (every
figure, settings, machine), `.md` (the tables) and `-<plot>.png`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench import report
from bench.cases import Context
from bench.scenarios import SCENARIOS
from bench.server import Server

ORDER = tuple(SCENARIOS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Measure orch8 against a raw SQL loop and "
        "pgqueuer on a real PostgreSQL (DATABASE_URL, else an embedded server).")
    parser.add_argument("scenario", choices=(*ORDER, "all"))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one repetition: checks the machinery in ~2 min")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="directory for the JSON, Markdown and PNG files")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "orch8-bench" / "postgres",
                        help="embedded PostgreSQL data directory when DATABASE_URL is unset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    if reps < 1:
        print("python -m bench: --reps must be at least 1", file=sys.stderr)
        return 2
    chosen = ORDER if args.scenario == "all" else (args.scenario,)
    server = Server.open(args.data_dir)
    context = Context(server, args.quick, reps)
    started, clock = datetime.now(UTC), time.monotonic()
    try:
        runs = {}
        for name in chosen:
            print(f"{name}: measuring", file=sys.stderr, flush=True)
            runs[name] = SCENARIOS[name].measure(context)
    finally:
        server.close()
    document = report.document(
        runs, server.facts(), command=" ".join(["python -m bench", *(argv or sys.argv[1:])]),
        started=started, seconds=time.monotonic() - clock, quick=args.quick)
    paths = report.write(document, runs, args.out, args.scenario)
    print(report.recommendation_text(document["recommendation"]))
    summary = document["summary"] if args.scenario == "all" else document["summary"][args.scenario]
    print(orjson.dumps({"scenario": args.scenario, **summary,
                        "files": [str(path) for path in paths]}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
