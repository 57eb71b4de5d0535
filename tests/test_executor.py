"""A claimed batch runs as a batch, and a step that waits leaves it without holding it up."""

from __future__ import annotations

import pytest

from orch8 import Client, State
from tests.engine_helpers import FAST, run_workers_until


@pytest.fixture
def client(dsn):
    with Client(dsn) as client:
        yield client


def test_a_step_that_waits_does_not_hold_up_the_rest_of_its_batch(dsn, client):
    client.create_sequence("slow", [{"id": "wait", "handler": "sleep", "params": {"ms": 60000}},
                                    {"id": "after", "handler": "noop"}])
    client.create_sequence("quick", [{"id": "a", "handler": "noop", "params": {"n": 1}},
                                     {"id": "b", "handler": "log", "params": {"message": "x"}},
                                     {"id": "c", "handler": "noop"}])
    # All due before the worker starts, so one claim takes them as one batch.
    slow = client.start("slow")
    quick = [client.start("quick", {"n": n}) for n in range(5)]

    def quick_ones_done() -> bool:
        return all(client.get(c.id).state == State.COMPLETED for c in quick)

    # No drain time: what still runs when the quick ones are done is released at once.
    workers = run_workers_until(dsn, quick_ones_done,
                                settings=FAST.with_overrides(drain_timeout_s=0))
    for created in quick:
        assert client.get(created.id).outputs == {"a": {"n": 1}, "b": {"message": "x"}, "c": {}}
    waited = client.get(slow.id)
    assert waited.state == State.SCHEDULED and waited.outputs == {}
    counts = workers[0].stats.counts
    assert counts["claimed"] == 6 and counts["completed"] == 5 and counts["released"] == 1
    assert workers[0].in_flight == 0
