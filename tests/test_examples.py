"""Every program in examples/ runs against a real node and does what it says.

One node serves the module, started with the examples' handler modules. Each program runs
as a user would run it (its own process, `DATABASE_URL` naming the database), and the test
then checks in the database what the program claims to have done.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orch8 import Client, State
from tests.databases import scratch_database
from tests.supervisor_process import REPO_DIR, Cluster

EXAMPLES = REPO_DIR / "examples"
PROGRAMS = sorted(path.name for path in EXAMPLES.glob("*.py")
                  if not path.stem.endswith("_handlers"))


RECORDED_SPAN = """
SELECT extract(epoch FROM max(o.created_at) - min(o.created_at))::float
FROM step_outputs o JOIN instances i ON i.id = o.instance_id
WHERE i.sequence_name = %(sequence)s
"""


@pytest.fixture(scope="module")
def examples_dsn(server_dsn: str, template_name: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database with a node running the examples' handlers."""
    with scratch_database(server_dsn, template_name) as dsn:
        cluster = Cluster(dsn, tmp_path_factory.mktemp("examples"))
        try:
            cluster.start("examples", ORCH8_HANDLERS="tour_handlers,fan_out_handlers",
                          PYTHONPATH=os.pathsep.join([str(EXAMPLES), str(REPO_DIR)]))
            yield dsn
        finally:
            cluster.close()


def run_example(name: str, dsn: str, tmp_path: Path) -> str:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("ORCH8_") and key != "PYTHONPATH"}
    environment["DATABASE_URL"] = dsn
    # From another directory: a program must not depend on where it is started.
    completed = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path,
                               env=environment, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def test_every_example_program_has_a_test():
    assert PROGRAMS == ["enqueue_in_transaction.py", "fan_out.py", "tour.py"]


def test_tour(examples_dsn: str, tmp_path: Path):
    assert run_example("tour.py", examples_dsn, tmp_path) == "Hello, Ada from platform\n"
    with Client(examples_dsn) as client:
        [listed] = client.list(sequence="welcome")
        welcome = client.get(listed.id)  # with its step outputs
    assert welcome.state == State.COMPLETED and welcome.idempotency_key == "signup-ada"
    assert welcome.outputs is not None
    assert welcome.outputs["hello"] == {"greeting": "Hello, Ada"}


def test_fan_out_keeps_to_its_concurrency_keys_and_rate_limit(examples_dsn: str,
                                                              tmp_path: Path):
    printed = run_example("fan_out.py", examples_dsn, tmp_path).splitlines()
    assert printed[:2] == ["30 instances: {'completed': 30}",
                           "most calls at once for one account: 1 (key cap 1)"]
    busiest = re.fullmatch(r"most calls received in any 1000 ms: (\d+) \(rate limit 5\)",
                           printed[2])
    # The figure is counted at the endpoint, which sees each call some milliseconds after
    # the database admitted it, by delays that vary with the machine's load; so it is
    # reported, and the limit is checked below by the database's own clock.
    assert busiest is not None, printed
    with Client(examples_dsn) as client:
        runs = [client.get(run.id) for run in client.list(sequence="notify-account",
                                                           limit=1000)]
        [limit] = client.list_rate_limits()
    assert len(runs) == 30 and {run.state for run in runs} == {State.COMPLETED}
    assert {run.concurrency_key for run in runs} == {f"account-{n}" for n in range(10)}
    assert (limit.handler, limit.max_calls, limit.window_ms) == ("notify_account", 5, 1000)
    # By the database's clock: at 5 calls a second over a sliding window, the last five
    # calls start five windows after the first five, so the outputs span over 5 s (6.6 s
    # measured under load). Without the limit, each account's three calls in turn were
    # recorded within 1.2 s on the same loaded machine.
    with psycopg.connect(examples_dsn) as conn:
        span = conn.execute(RECORDED_SPAN, {"sequence": "notify-account"}).fetchone()[0]
    assert span >= 4.0
    # Each step's output is the endpoint's reply: every event was received once.
    received = sorted((run.outputs or {})["notify"]["received"]["event"] for run in runs)
    assert received == sorted(list(range(3)) * 10)


def test_enqueue_in_transaction_commits_both_or_neither(examples_dsn: str, tmp_path: Path):
    printed = run_example("enqueue_in_transaction.py", examples_dsn, tmp_path).splitlines()
    committed = re.fullmatch(r"order (\w+) committed: workflow completed, "
                             r"'order \1: shipping a book'", printed[0])
    rolled_back = re.fullmatch(r"order (\w+) rolled back: order saved False, "
                               r"workflows started 0", printed[1])
    assert committed and rolled_back, printed
    with psycopg.connect(examples_dsn) as conn:
        orders = conn.execute("SELECT id FROM example_orders").fetchall()
    with Client(examples_dsn) as client:
        workflows = client.list(sequence="fulfil-order")
    assert orders == [(committed[1],)]
    assert [(w.input["order_id"], w.state) for w in workflows] == [
        (committed[1], State.COMPLETED)]
