"""`python -m bench <scenario> [--quick]`: see README, section Benchmarks.

Progress goes to stderr; stdout carries the recommendation and, as its last line, one
JSON object with the scenario's summary. Files: `<out>/bench-<scenario>.json` (every
figure, settings, machine), `.md` (the tables) and `-<plot>.png`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import orjson
import psycopg

from bench import report
from bench.cases import Context
from bench.runs import Run
from bench.scenarios import SCENARIOS
from bench.server import DATA_DIR, Server
from orch8.database import redact
from orch8.errors import ConfigError

ORDER = tuple(SCENARIOS)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message, 2)


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr, never a traceback (the DSN's password hidden)."""
    print(f"python -m bench: {redact(' '.join(message.split()))}", file=sys.stderr)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m bench", description="Measure orch8 against a raw SQL loop and "
        "pgqueuer on a real PostgreSQL (DATABASE_URL, else an embedded server).")
    parser.add_argument("scenario", choices=(*ORDER, "all"))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one repetition: checks the machinery in ~2 min")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--size", type=float, default=1.0,
                        help="share of the default sizes (backlogs, background rows), e.g. "
                        "0.2 on a machine too loaded for the full run (default 1)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="directory for the JSON, Markdown and PNG files")
    parser.add_argument("--data-dir", type=Path,
                        default=DATA_DIR,
                        help="embedded PostgreSQL data directory when DATABASE_URL is unset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reps is not None and args.reps < 1:
        _fail("--reps must be at least 1", 2)
    if not 0 < args.size <= 10:
        _fail("--size must be above 0 and at most 10", 2)
    # SIGTERM unwinds like Ctrl-C, so that the nodes and databases of the run are stopped
    # and dropped on the way out rather than left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        _fail("stopped; the files hold the scenarios finished so far", 130)
    except (RuntimeError, OSError, psycopg.Error, ConfigError) as error:
        _fail(f"{type(error).__name__}: {error}", 1)


# Where the files go and where the embedded server keeps its data are paths on the
# machine that ran, not settings of what was measured: the recorded command leaves them out.
PLACES = ("--out", "--data-dir")


def recorded_command(argv: list[str]) -> str:
    """The command line as a report records it, without `PLACES` and their values."""
    shown: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        if argument in PLACES:
            next(arguments, None)  # its value
        elif not argument.startswith(tuple(f"{place}=" for place in PLACES)):
            shown.append(argument)
    return " ".join(["python -m bench", *shown])


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    reps = args.reps or (1 if args.quick else 3)
    chosen = ORDER if args.scenario == "all" else (args.scenario,)
    server = Server.open(args.data_dir)
    context = Context(server, args.quick, reps, args.size)
    started, clock = datetime.now(UTC), time.monotonic()
    facts = server.facts()
    command = recorded_command(argv if argv is not None else sys.argv[1:])
    runs: dict[str, Run] = {}
    try:
        for name in chosen:
            print(f"{name}: measuring", file=sys.stderr, flush=True)
            runs[name] = SCENARIOS[name].measure(context)
            # Written after every scenario: a long run stopped midway keeps what it measured.
            document = report.document(
                runs, facts, command=command, started=started,
                seconds=time.monotonic() - clock, quick=args.quick,
                pending=[other for other in chosen if other not in runs])
            paths = report.write(document, runs, args.out, args.scenario)
    finally:
        server.close()
    print(report.recommendation_text(document["recommendation"]))
    summary = document["summary"] if args.scenario == "all" else document["summary"][args.scenario]
    print(orjson.dumps({"scenario": args.scenario, **summary,
                        "files": [str(path) for path in paths]}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
