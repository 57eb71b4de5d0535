"""The Python client finds its database the way a node does."""

from __future__ import annotations

import pytest

from orch8 import Client
from orch8.errors import NotFound


def test_client_without_a_dsn_reads_database_url(dsn, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", dsn)
    with Client() as client:
        client.create_sequence("env", [{"id": "a", "handler": "noop"}])
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
