"""The standalone bench tools run end to end on a real server and print their figures.

Only that they run, finish every instance or request they start, and report each case:
their figures are read by people, never checked against a threshold here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from bench._common import drop_database, scratch_database
from bench.pool_check import CHECKS
from bench.server import LEFTOVER, drop_leftovers
from bench.sql_floor import CASES

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bench


def run_tool(server_dsn: str, *arguments: str) -> dict:
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("ORCH8_")} | {"DATABASE_URL": server_dsn}
    result = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=environ,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sql_floor_finishes_every_case_and_reports_its_costs(server_dsn: str) -> None:
    # The tool exits non-zero if a case leaves any of its instances unfinished.
    summary = run_tool(server_dsn, "bench/sql_floor.py", "--runs", "1", "--instances", "1000")
    assert list(summary) == list(CASES)
    for name, figures in summary.items():
        assert figures["wal_bytes"]["median"] > 0, name  # it wrote: claims and finishes ran
        assert figures["postgres_us"]["median"] >= 0 and figures["per_s"]["median"] > 0, name
    assert summary["raw loop"]["postgres_vs_raw"]["median"] == 1.0


def test_pool_check_runs_each_check(server_dsn: str) -> None:
    summary = run_tool(server_dsn, "bench/pool_check.py", "--runs", "1", "--requests", "100")
    assert list(summary) == list(CHECKS)
    for name, figures in summary.items():
        assert figures["wall_us"]["median"] > 0 and figures["cpu_us"]["median"] > 0, name


def test_cpu_split_drains_beside_the_raw_loop_and_orch8s_statements_and_gives_ratios(
        server_dsn: str) -> None:
    # The tool exits non-zero if any drain leaves an instance unfinished. The processes'
    # CPU counters move in 10 ms ticks: 500 instances could take two workers less than one
    # tick each, and read as no CPU at all; 3,000 take several.
    summary = run_tool(server_dsn, "bench/cpu_split.py", "--runs", "1", "--instances", "3000",
                       "--raw", "--own-sql")
    alone = "orch8's statements alone, batch 100, 2 processes"
    assert list(summary) == ["raw loop, batch 100, 2 processes", alone,
                             "as migrated, batch 100/100"]
    node = summary["as migrated, batch 100/100"]
    raw = summary["raw loop, batch 100, 2 processes"]
    statements = summary[alone]
    assert node["vs_raw"]["median"] == node["per_s"]["median"] / raw["per_s"]["median"]
    assert statements["vs_raw"]["median"] == (statements["per_s"]["median"]
                                              / raw["per_s"]["median"])
    assert node["vs_own_sql"]["median"] == (node["per_s"]["median"]
                                            / statements["per_s"]["median"])
    assert node["workers_us"]["median"] > 0 and node["postgres_us"]["median"] > 0
    assert statements["postgres_us"]["median"] > 0


def test_cpu_split_drains_a_node_of_another_tree_with_that_trees_own_code(
        server_dsn: str, tmp_path: Path) -> None:
    """`--tree`: the other tree's node runs its own code, workers included (they once
    imported from the working directory instead), and its rate comes as a ratio to this
    tree's. The other tree is a copy of this one whose workers leave a mark as they start."""
    tree = tmp_path / "tree"
    for part in ("orch8", "supervisor", "migrations", "bench"):
        shutil.copytree(ROOT / part, tree / part,
                        ignore=shutil.ignore_patterns("results", "__pycache__"))
    marks = tmp_path / "marks"
    child = tree / "supervisor" / "child.py"
    source = child.read_text()
    started = "    _set_up_process(start)\n"
    assert source.count(started) == 1
    child.write_text(source.replace(started, started + (
        f"    with open({str(marks)!r}, 'a') as marks:\n"
        "        marks.write(f'{os.getpid()}\\n')\n")))
    summary = run_tool(server_dsn, "bench/cpu_split.py", "--runs", "1", "--instances", "3000",
                       "--tree", f"copy={tree}")
    ours, theirs = "as migrated, batch 100/100", "copy: as migrated, batch 100/100"
    assert list(summary) == [ours, theirs]
    assert summary[theirs]["vs_this_tree"]["median"] == (summary[theirs]["per_s"]["median"]
                                                         / summary[ours]["per_s"]["median"])
    # Two workers of the copy's node, none of this tree's.
    assert len(marks.read_text().split()) == 2


def test_a_killed_runs_databases_are_dropped_and_a_live_ones_kept(server_dsn: str) -> None:
    # A run killed before it could drop its databases leaves them named for its process.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left, alive = f"orch8_bench_{gone.pid}_0", f"orch8_bench_{os.getpid()}_999"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        for name in (left, alive):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        assert left in drop_leftovers(server_dsn)
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        assert left not in names and alive in names
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            for name in (left, alive):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def test_the_older_tools_scratch_databases_are_named_for_their_process(server_dsn: str) -> None:
    """`scratch_database` (the tools built on `bench/_common.py`) names its databases as
    `Server` does, so that a killed tool's are dropped by the next run too."""
    dsn = scratch_database(server_dsn)
    try:
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        match = re.match(LEFTOVER, str(name))
        assert match is not None and int(match[1]) == os.getpid()
    finally:
        drop_database(server_dsn, dsn)
