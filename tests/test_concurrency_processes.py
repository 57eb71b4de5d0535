"""Concurrency keys with several worker processes claiming at once, measured from outside.

Three worker processes (as a supervisor would run them) share keys with small caps and
unkeyed work. Each step records its real start and end; the intervals show how many of a
key's steps ever ran at the same moment (it must never pass the cap), and how close a
saturated key's throughput came to its ideal (cap / step time).
"""

from __future__ import annotations

import psycopg

from orch8 import Client
from orch8.config import Settings
from tests.limits_processes import wait_until_finished, worker_processes

STEP_MS = 40
KEYS = {"one": (1, 30), "two": (2, 40), "three": (3, 45)}  # key: (cap, instances)
UNKEYED = 60
SETTINGS = Settings(tick_interval_ms=50, commit_linger_ms=1.0, batch_size=20,
                    max_in_flight=20, drain_timeout_s=10)


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant (an end before a start)."""
    events = sorted([(start, 1) for start, _ in intervals]
                    + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, change in events:
        open_now += change
        peak = max(peak, open_now)
    return peak


def test_keys_never_overshoot_across_worker_processes(dsn):
    with Client(dsn) as client:
        client.create_sequence("timed", [
            {"id": "step", "handler": "test_timed_step", "params": {"sleep_ms": STEP_MS}}])
        requests = [{"sequence": "timed", "input": {"label": key}, "concurrency_key": key,
                     "max_concurrency": cap}
                    for key, (cap, count) in KEYS.items() for _ in range(count)]
        requests += [{"sequence": "timed", "input": {"label": "unkeyed"}}] * UNKEYED
        # All due at once, so every process races for every key from the first tick.
        with worker_processes(dsn, ["node-a", "node-b", "node-c"], SETTINGS):
            client.start_many(requests)
            wait_until_finished(dsn, len(requests), timeout_s=60)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT label, node_id, started, ended FROM observed_calls").fetchall()
    print(f"\nstep {STEP_MS} ms, 3 worker processes")
    for key, (cap, count) in KEYS.items():
        calls = [(started, ended) for label, _, started, ended in rows if label == key]
        nodes = {node for label, node, _, _ in rows if label == key}
        assert len(calls) == count
        peak = most_at_once(calls)
        span = max(end for _, end in calls) - min(start for start, _ in calls)
        throughput, ideal = count / span, cap / (STEP_MS / 1000)
        print(f"key {key!r}: cap {cap}, most running at once {peak}, "
              f"{throughput:.1f}/s vs ideal {ideal:.1f}/s ({throughput / ideal:.0%}), "
              f"ran on {len(nodes)} processes")
        assert peak <= cap, f"key {key} ran {peak} at once with max_concurrency {cap}"
        if cap == 1:
            ordered = sorted(calls)
            gaps = sorted(b[0] - a[1] for a, b in zip(ordered, ordered[1:], strict=False))
            print(f"key {key!r}: a freed slot's next step started after "
                  f"{gaps[len(gaps) // 2] * 1000:.0f} ms (median; commit, wake-up, claim)")
    assert sum(1 for label, *_ in rows if label == "unkeyed") == UNKEYED
