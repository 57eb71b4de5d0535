"""Concurrency keys with several worker processes claiming at once, measured from outside.

Three worker processes (as a supervisor would run them) share keys with small caps and
unkeyed work. Each step records its real start and end; the intervals show how many of a
key's steps ever ran at the same moment (it must never pass the cap). How close a
saturated key's throughput comes to its ideal is a figure: `bench/key_saturation.py`.
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


def run_keyed_load(dsn: str) -> list[tuple[str, str, float, float]]:
    """Run the keyed and unkeyed instances on three worker processes; every call made."""
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
        return conn.execute(
            "SELECT label, node_id, started, ended FROM observed_calls").fetchall()


def test_keys_never_overshoot_across_worker_processes(dsn):
    rows = run_keyed_load(dsn)
    for key, (cap, count) in KEYS.items():
        calls = [(started, ended) for label, _, started, ended in rows if label == key]
        assert len(calls) == count
        peak = most_at_once(calls)
        assert peak <= cap, f"key {key} ran {peak} at once with max_concurrency {cap}"
    assert sum(1 for label, *_ in rows if label == "unkeyed") == UNKEYED
