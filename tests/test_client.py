"""The Python client finds its database the way a node does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orch8 import Client
from orch8.errors import DefinitionError, NotFound
from orch8.model import MAX_JSON_DEPTH, Priority


def test_client_without_a_dsn_reads_database_url(dsn, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", dsn)
    with Client() as client:
        client.create_sequence("env", [{"id": "a", "handler": "noop"}])
        assert client.dsn == dsn  # what an application gives its own connections
    with Client(dsn) as explicit:
        assert [s.name for s in explicit.list_sequences()] == ["env"]


def test_start_many_is_all_or_nothing(dsn):
    with Client(dsn) as client:
        client.create_sequence("batch", [{"id": "a", "handler": "noop"}])
        with pytest.raises(NotFound):
            client.start_many([{"sequence": "batch"}, {"sequence": "missing"}])
        assert client.list() == []
        created = client.start_many([{"sequence": "batch", "input": {"n": n}} for n in range(3)])
        assert len({c.id for c in created}) == 3 and len(client.list()) == 3


def test_the_client_is_held_to_the_nesting_limit(dsn):
    deep: object = 1
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]
    with Client(dsn) as client:
        with pytest.raises(DefinitionError) as refused:
            client.create_sequence("deep", [{"id": "a", "handler": "noop",
                                             "params": {"a": deep}}])
        assert refused.value.field == "steps[0].params"
        client.create_sequence("deep", [{"id": "a", "handler": "noop"}])
        with pytest.raises(DefinitionError) as refused:
            client.start("deep", {"a": deep})
        assert refused.value.field == "input"
        assert client.list() == []


def test_start_many_keeps_idempotency_keys_within_and_across_batches(dsn):
    with Client(dsn) as client:
        client.create_sequence("keyed", [{"id": "a", "handler": "noop"}])
        first = client.start("keyed", {"n": 0}, idempotency_key="earlier")
        created = client.start_many([
            {"sequence": "keyed", "input": {"n": 1}, "idempotency_key": "twice"},
            {"sequence": "keyed", "input": {"n": 2}},
            {"sequence": "keyed", "input": {"n": 3}, "idempotency_key": "twice"},
            {"sequence": "keyed", "input": {"n": 4}, "idempotency_key": "earlier"},
        ])
        assert [c.deduplicated for c in created] == [False, False, True, True]
        assert created[2].id == created[0].id and created[3].id == first.id
        assert client.get(created[0].id).input == {"n": 1}
        assert len(client.list()) == 3


def test_start_many_stores_every_field_a_request_sets(dsn):
    # A batch travels as arrays read by position: each field must land in its own column.
    with Client(dsn) as client:
        for _ in range(2):
            client.create_sequence("fields", [{"id": "a", "handler": "noop"}])
        moment = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        created = client.start_many([
            {"sequence": "fields", "input": {"n": 1}, "priority": "high", "version": 1,
             "run_at": moment.isoformat(), "idempotency_key": "k", "concurrency_key": "c",
             "max_concurrency": 2},
            {"sequence": "fields", "input": {"n": 2}, "delay_ms": 3_600_000},
        ])
        first, second = (client.get(c.id) for c in created)
        assert (first.input, first.priority, first.sequence_version, first.next_fire_at,
                first.idempotency_key, first.concurrency_key, first.max_concurrency) == (
            {"n": 1}, Priority.HIGH, 1, moment, "k", "c", 2)
        assert (second.input, second.priority, second.sequence_version, second.idempotency_key,
                second.concurrency_key, second.max_concurrency) == (
            {"n": 2}, Priority.NORMAL, 2, None, None, None)
        # Both times are the inserting transaction's now(): the delay, exactly.
        assert second.next_fire_at - second.created_at == timedelta(hours=1)
