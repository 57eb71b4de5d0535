"""The Python client finds its database the way a node does."""

from __future__ import annotations

import pytest

from orch8 import Client
from orch8.errors import NotFound


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
