"""Sequence definitions are validated on creation, with errors naming the field."""

from __future__ import annotations

import pytest

from orch8 import Client
from orch8.errors import DefinitionError, NotFound
from orch8.model import Priority, parse_steps
from orch8.requests import parse_new_instance
from orch8.store.instances import NewInstance


@pytest.mark.parametrize("steps, field", [
    ([], "steps"),
    ("nope", "steps"),
    ([{"handler": "noop"}], "steps[0].id"),
    ([{"id": "a", "handler": "noop"}, {"id": "a", "handler": "noop"}], "steps[1].id"),
    ([{"id": "a", "handler": ""}], "steps[0].handler"),
    ([{"id": "a", "handler": "noop", "params": []}], "steps[0].params"),
    ([{"id": "a", "handler": "noop", "colour": "red"}], "steps[0].colour"),
    ([{"id": "a", "handler": "noop", "timeout_ms": 0}], "steps[0].timeout_ms"),
    ([{"id": "a", "handler": "noop", "delay_ms": -5}], "steps[0].delay_ms"),
    ([{"id": "a", "handler": "noop", "delay_ms": True}], "steps[0].delay_ms"),
    ([{"id": "a", "handler": "noop", "retry": {"max_attempts": 0}}], "steps[0].retry.max_attempts"),
    ([{"id": "a", "handler": "noop", "retry": {"multiplier": 0.5}}], "steps[0].retry.multiplier"),
    ([{"id": "a", "handler": "noop",
       "retry": {"initial_backoff_ms": 500, "max_backoff_ms": 100}}],
     "steps[0].retry.max_backoff_ms"),
])
def test_invalid_steps_name_the_offending_field(steps, field):
    with pytest.raises(DefinitionError) as raised:
        parse_steps(steps)
    assert raised.value.field == field


@pytest.mark.parametrize("body, field", [
    ({"input": {}}, "sequence"),
    ({"sequence": "s", "input": [1]}, "input"),
    ({"sequence": "s", "priority": "urgent"}, "priority"),
    ({"sequence": "s", "delay_ms": 5, "run_at": "2030-01-01T00:00:00Z"}, "run_at"),
    ({"sequence": "s", "run_at": "tomorrow"}, "run_at"),
    ({"sequence": "s", "run_at": "2030-01-01T00:00:00"}, "run_at"),
    ({"sequence": "s", "concurrency_key": "k"}, "max_concurrency"),
    ({"sequence": "s", "concurrency_key": "k", "max_concurrency": 0}, "max_concurrency"),
    ({"sequence": "s", "version": 10**12}, "version"),
    ({"sequence": "s", "surprise": 1}, "surprise"),
])
def test_invalid_instance_requests_name_the_field(body, field):
    with pytest.raises(DefinitionError) as raised:
        parse_new_instance(body)
    assert raised.value.field == field


def test_a_new_definition_is_the_next_version_and_instances_pin_theirs(dsn):
    with Client(dsn) as client:
        first = client.create_sequence("flow", [{"id": "a", "handler": "noop"}])
        pinned = client.start("flow").id
        second = client.create_sequence("flow", [{"id": "a", "handler": "noop"},
                                                 {"id": "b", "handler": "noop"}])
        assert (first.version, second.version) == (1, 2)
        assert client.get_sequence("flow").version == 2
        assert len(client.get_sequence("flow", 1).steps) == 1
        assert client.get(pinned).sequence_version == 1
        assert client.get(client.start("flow").id).sequence_version == 2
        assert client.get(client.start("flow", version=1).id).sequence_version == 1
        with pytest.raises(NotFound):
            client.start("flow", version=3)
        with pytest.raises(NotFound):
            client.start("missing")


def test_run_at_beyond_year_9999_in_utc_is_refused():
    with pytest.raises(DefinitionError, match="years 1 to 9999"):
        parse_new_instance({"sequence": "s", "run_at": "0001-01-01T00:00:00+14:00"})


def test_max_concurrency_is_bounded():
    with pytest.raises(DefinitionError) as raised:
        parse_new_instance({"sequence": "s", "concurrency_key": "k", "max_concurrency": 1001})
    assert raised.value.field == "max_concurrency"


@pytest.mark.parametrize("body, expected", [
    # The plain requests (sequence, input, delay) and every field beside them.
    ({"sequence": "s"}, NewInstance("s", {})),
    ({"sequence": "s", "input": None, "delay_ms": 5}, NewInstance("s", {}, delay_ms=5)),
    ({"sequence": "s", "input": {"a": [1]}}, NewInstance("s", {"a": [1]})),
    ({"sequence": "s", "priority": "high"}, NewInstance("s", {}, priority=Priority.HIGH)),
    ({"sequence": "s", "version": 2}, NewInstance("s", {}, version=2)),
    ({"sequence": "s", "idempotency_key": "k"}, NewInstance("s", {}, idempotency_key="k")),
    ({"sequence": "s", "concurrency_key": "k", "max_concurrency": 3},
     NewInstance("s", {}, concurrency_key="k", max_concurrency=3)),
])
def test_every_field_a_request_sets_is_kept(body, expected):
    assert parse_new_instance(body) == expected
