"""A rate limit held across three nodes, measured from the handler's side.

Three worker processes with distinct node ids share one limited handler and a backlog
far larger than one window allows. Every call records when it really started; from those
times the test counts calls per window: in fixed windows (max and mean, against the
limit) and in the worst window wherever it starts (which must never exceed the limit).
"""

from __future__ import annotations

import bisect

import psycopg

from orch8 import Client
from orch8.config import Settings
from tests.limits_processes import wait_until_finished, worker_processes

MAX_CALLS = 10
WINDOW_S = 0.5
INSTANCES = 80
SETTINGS = Settings(tick_interval_ms=50, commit_linger_ms=1.0, batch_size=20,
                    max_in_flight=20, drain_timeout_s=10)


def worst_window(starts: list[float], window: float) -> int:
    """The most calls in any half-open window [t, t + window), t anywhere."""
    return max(bisect.bisect_left(starts, start + window) - index
               for index, start in enumerate(starts))


def fixed_windows(starts: list[float], window: float) -> list[int]:
    """Calls in consecutive windows from the first call; the last, partial one dropped."""
    first, last = starts[0], starts[-1]
    count = int((last - first) // window)
    return [bisect.bisect_left(starts, first + (n + 1) * window)
            - bisect.bisect_left(starts, first + n * window) for n in range(count)]


def test_three_nodes_never_pass_the_limit_in_any_window(dsn):
    with Client(dsn) as client:
        client.create_sequence("limited", [{"id": "call", "handler": "test_timed_step"}])
        client.set_rate_limit("test_timed_step", MAX_CALLS, int(WINDOW_S * 1000))
        with worker_processes(dsn, ["node-1", "node-2", "node-3"], SETTINGS):
            client.start_many([{"sequence": "limited"}] * INSTANCES)
            wait_until_finished(dsn, INSTANCES, timeout_s=60)
        failed = [i for i in client.list(limit=1000) if i.last_error is not None]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT node_id, started FROM observed_calls").fetchall()
    starts = sorted(started for _, started in rows)
    windows = fixed_windows(starts, WINDOW_S)
    worst = worst_window(starts, WINDOW_S)
    per_node = {node: sum(1 for n, _ in rows if n == node) for node in sorted({n for n, _ in rows})}
    mean = sum(windows) / len(windows)
    print(f"\nlimit {MAX_CALLS} calls / {WINDOW_S * 1000:.0f} ms, {INSTANCES} calls, 3 nodes "
          f"{per_node}: fixed windows max {max(windows)} mean {mean:.1f} "
          f"({mean / MAX_CALLS:.0%} of the limit) over {len(windows)} full windows; "
          f"worst window anywhere {worst}")
    assert len(starts) == INSTANCES, "a call ran twice or never"
    assert failed == [], "a deferred step was failed"
    assert worst <= MAX_CALLS
    assert len(per_node) == 3
