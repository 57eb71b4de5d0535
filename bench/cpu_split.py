"""Where a drain's CPU goes: PostgreSQL, the workers and the supervisor, per instance.

    python bench/cpu_split.py [--instances 30000] [--runs 3] [--batch 100/100 ...]
                              [--variant NAME=SQL ...] [--tree NAME=DIR ...]

Drains a backlog of one-step `noop` instances with a real `orch8-supervisor --workers 2`
(as `python -m bench` does) and reads the CPU time the processes' own counters give: every
PostgreSQL process (the postmaster's live children plus those it has reaped), the worker
processes and the supervisor, before the backlog is released and once it has drained.
`--variant` runs SQL on each scratch database before its drain, e.g. to put back indexes a
migration dropped. `--tree` also drains nodes running the code of another source tree (a
`git worktree` of an earlier commit, say; started from that directory, on a database its
own migrations built, the backlog written by this tree's client), with each rate as a
ratio to this tree's in the same run: an A/B of two commits. Batch settings, variants and
trees alternate within each run, every other run in reverse order (A B C, C B A, ...), the
raw loop and orch8's statements with them: before the nodes in one run, after them in the
next. `--raw` adds the minimal raw loop (`bench/raw.py`, 2 processes, the first batch
size) to each run, and each configuration's rate as a ratio to the raw loop's in that run:
with a long drain, the steady state that a 5,000-instance drain on a node just started
only nears, and PostgreSQL's CPU per instance for it. `--own-sql` adds orch8's own statements sent
by the same minimal loop (`bench/own_sql.py`, 2 processes, the first batch size) and
PostgreSQL's CPU for them: what the schema and statements allow before any engine runs, so
the gap between the raw loop and the node splits in two.
Reads `/proc` through psutil, so PostgreSQL must run on this machine: the embedded
server, or a local one in `DATABASE_URL` whose data directory is readable here. The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import engine, own_sql, raw  # noqa: E402
from bench.engine import NodeSettings  # noqa: E402
from bench.runs import Figure, summarised  # noqa: E402
from bench.server import DATA_DIR, Server  # noqa: E402
from orch8.config import Settings  # noqa: E402


def postmaster(dsn: str) -> psutil.Process:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    return psutil.Process(int((Path(row[0]) / "postmaster.pid").read_text().split()[0]))


def cpu_seconds(server: psutil.Process) -> dict[str, float]:
    """CPU seconds so far: PostgreSQL (live and reaped), orch8 workers, orch8 supervisors."""
    own = server.cpu_times()
    split = {"postgres": own.user + own.system + own.children_user + own.children_system,
             "workers": 0.0, "supervisor": 0.0}
    for child in server.children():
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue  # exited in between: its time is now in children_*
        split["postgres"] += times.user + times.system
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        group = ("workers" if title.startswith("orch8 worker ")
                 else "supervisor" if title.startswith("orch8 supervisor ") else None)
        if group:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            split[group] += times.user + times.system
    return split


def drain(dsn: str, server: psutil.Process, settings: NodeSettings,
          count: int, root: Path = engine.ROOT) -> dict[str, float]:
    sequence = engine.new_sequence(dsn)
    with engine.started(dsn, settings, root=root) as booting, engine.Watch(dsn) as watch:
        backlog = engine.Backlog(dsn, sequence, count)
        engine.ready(booting)
        before = cpu_seconds(server)
        released = backlog.release()
        figure = engine.finish(watch, backlog, released, timeout_s=300)
        after = cpu_seconds(server)
    _check(figure, "the drain")
    used = {group: (after[group] - before[group]) * 1e6 / count for group in after}
    return {"per_s": figure.per_s, **{f"{group}_us": value for group, value in used.items()}}


def migrate_with(root: Path, dsn: str) -> None:
    """Build the schema with the migrations of the source tree `root`, its own code."""
    environ = engine.clean_environ() | {"PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from orch8.migrate import migrate; "
         "migrate(sys.argv[1])", dsn], cwd=root, env=environ, capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise SystemExit(f"cpu_split: migrating with {root} failed: {lines[-1]}")


def raw_drain(dsn: str, server: psutil.Process, batch: int, count: int) -> dict[str, float]:
    """The raw loop's rate and PostgreSQL's CPU per instance (`_server_cpu`)."""
    return _server_cpu(server, count, "the raw drain", lambda at_release: raw.drain(
        dsn, batch, 2, count, at_release=at_release))


def own_sql_drain(dsn: str, server: psutil.Process, batch: int,
                  count: int) -> dict[str, float]:
    """orch8's statements alone: their rate and PostgreSQL's CPU per instance
    (`_server_cpu`)."""
    return _server_cpu(server, count, "the drain of orch8's statements alone",
                       lambda at_release: own_sql.drain(dsn, batch, 2, count,
                                                        at_release=at_release))


def _server_cpu(server: psutil.Process, count: int, what: str,
                drain: Callable[[Callable[[], object]], Figure]) -> dict[str, float]:
    """A minimal loop's rate, and PostgreSQL's CPU per instance read from the backlog's
    release (`drain` calls the callback it is given just before it) to the last finish.
    The loop's own processes are not split: their start would weigh more than their
    work."""
    before: dict[str, float] = {}
    figure = drain(lambda: before.update(cpu_seconds(server)))
    after = cpu_seconds(server)
    _check(figure, what)
    return {"per_s": figure.per_s,
            "postgres_us": (after["postgres"] - before["postgres"]) * 1e6 / count}


def _check(figure: Figure, what: str) -> None:
    if not figure.complete:
        raise SystemExit(f"cpu_split: {what} did not complete ({figure.completed} done)")


def _record(found: dict[str, list[dict[str, float]]], run: int, label: str,
            figures: dict[str, float]) -> None:
    """Keep one run's figures under `label` and print them (a ratio to two decimals)."""
    found.setdefault(label, []).append(figures)
    shown = ", ".join(f"{k} {v:,.2f}" if k.startswith("vs_") else f"{k} {v:,.1f}"
                      for k, v in figures.items())
    print(f"run {run + 1}: {label}: {shown}", flush=True)


# One node configuration of a run: (batch size, max in flight), variant, tree (None: this).
Setup = tuple[tuple[int, ...], str, str | None]


def _drain_nodes(server: Server, pid: psutil.Process, setups: list[Setup],
                 variants: dict[str, str], trees: dict[str | None, Path],
                 count: int) -> list[tuple[Setup, dict[str, float]]]:
    """One run's node drains, in the order given, each with its figures."""
    drained = []
    for setup in setups:
        (batch, in_flight), name, tree = setup
        with server.database(migrated=tree is None) as dsn:
            if tree is not None:
                migrate_with(trees[tree], dsn)
            if variants[name]:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(variants[name])
            drained.append((setup, drain(dsn, pid, NodeSettings(
                workers=2, batch_size=batch, max_in_flight=in_flight), count, trees[tree])))
    return drained


def _record_nodes(found: dict[str, list[dict[str, float]]], run: int,
                  drained: list[tuple[Setup, dict[str, float]]],
                  versus: dict[str, float | None]) -> None:
    """Record a run's node drains, each rate also as a ratio to the rates in `versus`
    (the raw loop's, orch8's statements'), and another tree's to this one's."""
    this_tree = {(batch, name): figures["per_s"]
                 for (batch, name, tree), figures in drained if tree is None}
    # (This tree's first, in the printed lines as in the summary: the others' ratios are
    # to them.)
    for (batch, name, tree), figures in sorted(drained, key=lambda d: d[0][2] is not None):
        for key, rate in versus.items():
            if rate:
                figures[key] = figures["per_s"] / rate
        label = f"{name}, batch {batch[0]}/{batch[1]}"
        if tree is not None:
            label = f"{tree}: {label}"
            figures["vs_this_tree"] = figures["per_s"] / this_tree[batch, name]
        _record(found, run, label, figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", nargs="+",
                        default=[f"{Settings.batch_size}/{Settings.max_in_flight}"],
                        help="batch size / max in flight, one or more (default: orch8's)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=SQL run on the scratch database before its drain")
    parser.add_argument("--tree", action="append", default=[],
                        help="NAME=DIR: also drain nodes running the code in DIR")
    parser.add_argument("--raw", action="store_true",
                        help="also the raw loop, and every rate as a ratio to its own")
    parser.add_argument("--own-sql", action="store_true",
                        help="also orch8's statements in the raw loop's shape (own_sql)")
    args = parser.parse_args()
    variants = {"as migrated": ""} | dict(v.split("=", 1) for v in args.variant)
    batches = [tuple(int(n) for n in text.split("/")) for text in args.batch]
    trees: dict[str | None, Path] = {None: engine.ROOT}
    for text in args.tree:
        name, _, directory = text.partition("=")
        if not (Path(directory) / "supervisor").is_dir():
            parser.error(f"--tree {text}: no orch8 source tree in {directory!r}")
        trees[name] = Path(directory).resolve()
    setups: list[Setup] = [(batch, variant, tree) for batch in batches
                           for variant in variants for tree in trees]
    server = Server.open(DATA_DIR)
    found: dict[str, list[dict[str, float]]] = {}
    try:
        pid = postmaster(server.dsn)
        for run in range(args.runs):
            # Every other run in reverse order, the raw loop and orch8's statements
            # included: neither always drains first, on a server just idle.
            parts = ["raw"] * args.raw + ["own_sql"] * args.own_sql + ["nodes"]
            drained: list[tuple[Setup, dict[str, float]]] = []
            raw = own = None
            for part in parts[::-1] if run % 2 else parts:
                if part == "raw":
                    with server.database(migrated=False) as dsn:
                        raw = raw_drain(dsn, pid, batches[0][0], args.instances)
                elif part == "own_sql":
                    with server.database() as dsn:
                        own = own_sql_drain(dsn, pid, batches[0][0], args.instances)
                else:
                    drained = _drain_nodes(server, pid, setups[::-1] if run % 2 else setups,
                                           variants, trees, args.instances)
            if raw is not None:
                _record(found, run, f"raw loop, batch {batches[0][0]}, 2 processes", raw)
            if own is not None:
                if raw is not None:
                    own["vs_raw"] = own["per_s"] / raw["per_s"]
                _record(found, run, f"orch8's statements alone, batch {batches[0][0]}, "
                        "2 processes", own)
            _record_nodes(found, run, drained, {
                "vs_raw": raw["per_s"] if raw else None,
                "vs_own_sql": own["per_s"] if own else None})
    finally:
        server.close()
    print(orjson.dumps(summarised(found)).decode())


if __name__ == "__main__":
    main()
