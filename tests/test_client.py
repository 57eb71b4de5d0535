"""The Python client finds its database the way a node does."""

from __future__ import annotations

import pytest

from orch8 import Client
from orch8.errors import DefinitionError, NotFound
from orch8.model import MAX_JSON_DEPTH


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
