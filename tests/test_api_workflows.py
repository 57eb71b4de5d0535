"""The workflow endpoints over real HTTP against a running node: success and error paths.

One node serves the module (one worker, one step at a time, so the queue test can hold
the worker busy); each test works under sequence names of its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from api_helpers import Node, database, running_node, wait_for

STEPS = [{"id": "a", "handler": "noop", "params": {"x": 1}}]
LATER = 3_600_000  # delay_ms that keeps an instance scheduled for the whole test


@pytest.fixture(scope="module")
def node(server_dsn: str, template_name: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with database(server_dsn, template_name) as dsn, running_node(
            dsn, tmp_path_factory.mktemp("node"), ORCH8_MAX_IN_FLIGHT="1",
            ORCH8_BATCH_SIZE="1") as node:
        yield node


@pytest.fixture
def api(node: Node) -> Iterator[httpx.Client]:
    with node.client() as client:
        yield client


@pytest.fixture
def name() -> str:
    return f"seq-{uuid.uuid4().hex[:10]}"


def count(node: Node, sql: str, *params: object) -> int:
    with psycopg.connect(node.dsn) as conn:
        row = conn.execute(sql, params).fetchone()
        assert row is not None
        return int(row[0])


def instances_of(node: Node, sequence: str) -> int:
    return count(node, "SELECT count(*) FROM instances WHERE sequence_name = %s", sequence)


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    for fragment in fragments:
        assert fragment in body["detail"]


def make_sequence(api: httpx.Client, name: str, steps: list | None = None) -> dict:
    response = api.post("/sequences", json={"name": name, "steps": steps or STEPS})
    assert response.status_code == 201, response.text
    return response.json()


def start(api: httpx.Client, name: str, **body: object) -> str:
    response = api.post("/instances", json={"sequence": name, **body})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def nested(depth: int) -> dict:
    """An object nested `depth` levels deep (the object itself is level 1)."""
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return {"a": value}


# --- sequences ---------------------------------------------------------------------------

def test_sequence_versions_and_reads(api: httpx.Client, name: str) -> None:
    first = make_sequence(api, name)
    second = make_sequence(api, name, steps=[{"id": "b", "handler": "log"}])
    assert (first["version"], second["version"]) == (1, 2)
    assert api.get(f"/sequences/{name}").json()["version"] == 2
    assert api.get(f"/sequences/{name}", params={"version": 1}).json()["steps"][0]["id"] == "a"
    listed = {item["name"]: item["version"] for item in api.get("/sequences").json()["sequences"]}
    assert listed[name] == 2
    assert_error(api.get(f"/sequences/{name}", params={"version": 3}), 404, "not_found",
                 f"{name} version 3")
    assert_error(api.get("/sequences/nope"), 404, "not_found", "nope")
    assert_error(api.get(f"/sequences/{name}", params={"version": "x"}), 400, "bad_request")
    assert_error(api.get("/sequences", params={"colour": "red"}), 400, "bad_request", "colour")


@pytest.mark.parametrize(("extra", "steps", "fragment"), [
    ({"extra": 1}, STEPS, "extra: unknown field"),
    ({}, [], "steps"),
    ({}, [{"id": "a", "handler": "noop", "retry": {"max_attempts": "3"}}],
     "steps[0].retry.max_attempts"),
    ({}, [{"id": "a", "handler": "noop", "delay_ms": 10**15}], "steps[0].delay_ms"),
    ({}, [{"id": "a", "handler": "noop"}, {"id": "a", "handler": "noop"}], "steps[1].id"),
    ({}, [{"id": "a", "handler": "noop", "colour": 1}], "steps[0].colour"),
    # Deeper than orch8 stores (64), and deeper than orjson can write back (about 254).
    ({}, [{"id": "a", "handler": "noop", "params": nested(65)}], "steps[0].params"),
    ({}, [{"id": "a", "handler": "noop", "params": nested(300)}], "steps[0].params"),
])
def test_sequence_refused(api: httpx.Client, node: Node, name: str, extra: dict,
                          steps: list, fragment: str) -> None:
    response = api.post("/sequences", json={"name": name, "steps": steps, **extra})
    assert_error(response, 422, "invalid", fragment)
    assert count(node, "SELECT count(*) FROM sequences WHERE name = %s", name) == 0


def test_sequence_body_must_be_an_object_with_a_good_name(api: httpx.Client) -> None:
    assert_error(api.post("/sequences", json=[1, 2]), 422, "invalid", "body")
    assert_error(api.post("/sequences", json={"name": "bad name!", "steps": STEPS}), 422,
                 "invalid", "name")


def test_malformed_unsupported_and_oversized_bodies(api: httpx.Client, node: Node,
                                                    name: str) -> None:
    make_sequence(api, name)
    json_type = {"Content-Type": "application/json"}
    assert_error(api.post("/sequences", content=b'{"name": ', headers=json_type), 400,
                 "bad_request", "malformed JSON")
    absurd = f'{{"sequence": "{name}", "delay_ms": {"9" * 40}}}'.encode()
    assert_error(api.post("/instances", content=absurd, headers=json_type), 422, "invalid",
                 "delay_ms")
    assert_error(api.post("/instances", content=f"sequence={name}".encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type")
    huge = f'{{"sequence": "{name}", "input": {{"pad": "'.encode() + b"x" * (3 << 20) + b'"}}'
    assert_error(api.post("/instances", content=huge, headers=json_type), 413,
                 "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield f'{{"sequence": "{name}", "input": {{"pad": "'.encode()
        for _ in range(40):
            yield b"x" * 100_000
        yield b'"}}'

    try:
        response = api.post("/instances", content=chunks(), headers=json_type)
    except httpx.RemoteProtocolError:
        pass  # the server answered 413 and closed while the client was still sending
    else:
        assert_error(response, 413, "payload_too_large")
    assert instances_of(node, name) == 0


# --- instances ---------------------------------------------------------------------------

def test_create_instance_and_idempotency(api: httpx.Client, node: Node, name: str) -> None:
    make_sequence(api, name)
    body = {"sequence": name, "input": {"n": 1}, "idempotency_key": f"order-{name}",
            "priority": "high", "concurrency_key": f"acct-{name}", "max_concurrency": 2}
    first = api.post("/instances", json=body)
    assert first.status_code == 201 and first.json()["deduplicated"] is False
    again = api.post("/instances", json=body)
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "deduplicated": True}
    instance = wait_for(api, first.json()["id"])
    assert instance["state"] == "completed" and instance["priority"] == "high"
    assert instance["input"] == {"n": 1} and instance["concurrency_key"] == f"acct-{name}"
    assert instance["outputs"] == {"a": {"x": 1}} and instance["last_error"] is None
    assert instance["finished_at"] is not None
    assert instances_of(node, name) == 1


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"sequence": "nope"}, 404, "nope"),
    ({"version": 9}, 404, "version 9"),
    ({"input": [1]}, 422, "input"),
    ({"priority": 5}, 422, "priority"),
    ({"delay_ms": "soon"}, 422, "delay_ms"),
    ({"delay_ms": 10**17}, 422, "delay_ms"),
    ({"delay_ms": -1}, 422, "delay_ms"),
    ({"delay_ms": 1.5}, 422, "delay_ms"),
    ({"run_at": "yesterday"}, 422, "run_at"),
    ({"run_at": "2030-01-01T00:00:00"}, 422, "run_at"),
    ({"run_at": "0001-01-01T00:00:00+14:00"}, 422, "run_at"),
    ({"run_at": "9999-12-31T23:00:00-05:00"}, 422, "run_at"),
    ({"max_concurrency": 2}, 422, "max_concurrency"),
    ({"colour": "red"}, 422, "colour: unknown field"),
    ({"input": {"text": "a\u0000b"}}, 422, "U+0000"),
    ({"idempotency_key": "k" * 300}, 422, "idempotency_key"),
    ({"sequence": 7}, 422, "sequence"),
    ({"input": nested(65)}, 422, "input: must be nested at most 64"),
    ({"input": nested(254)}, 422, "input: must be nested at most 64"),
])
def test_create_instance_refused(api: httpx.Client, node: Node, name: str, body: dict,
                                 status: int, fragment: str) -> None:
    make_sequence(api, name)
    response = api.post("/instances", json={"sequence": name} | body)
    assert_error(response, status, "not_found" if status == 404 else "invalid", fragment)
    assert instances_of(node, name) == 0


def test_json_as_deep_as_the_parser_reads_is_refused(api: httpx.Client, node: Node,
                                                      name: str) -> None:
    # 1,000 levels: orjson reads it (up to 1,024) but could never write it back out.
    make_sequence(api, name)
    body = f'{{"sequence": "{name}", "input": {{"a": {"[" * 999}1{"]" * 999}}}}}'
    response = api.post("/instances", content=body,
                        headers={"Content-Type": "application/json"})
    assert_error(response, 422, "invalid", "input: must be nested at most 64")
    assert instances_of(node, name) == 0


def test_the_deepest_accepted_values_are_written_back_out(api: httpx.Client,
                                                          name: str) -> None:
    deepest = nested(64)
    make_sequence(api, name, [{"id": "a", "handler": "noop", "params": deepest}])
    instance_id = start(api, name, input=deepest, delay_ms=60_000)
    assert api.get(f"/instances/{instance_id}").json()["input"] == deepest
    listed = api.get("/instances", params={"sequence": name})
    assert listed.status_code == 200 and listed.json()["instances"][0]["input"] == deepest
    assert api.get(f"/sequences/{name}").json()["steps"][0]["params"] == deepest


def test_batch_is_all_or_nothing(api: httpx.Client, node: Node, name: str) -> None:
    make_sequence(api, name)
    good = api.post("/instances/batch", json={"instances": [
        {"sequence": name, "input": {"n": n}, "delay_ms": LATER} for n in range(3)]})
    assert good.status_code == 201, good.text
    ids = [item["id"] for item in good.json()["instances"]]
    assert [api.get(f"/instances/{i}").json()["input"]["n"] for i in ids] == [0, 1, 2]
    invalid = api.post("/instances/batch", json={"instances": [
        {"sequence": name}, {"sequence": name, "priority": "urgent"}]})
    assert_error(invalid, 422, "invalid", "instances[1].priority")
    unknown = api.post("/instances/batch", json={"instances": [
        {"sequence": name}, {"sequence": "missing"}]})
    assert_error(unknown, 404, "not_found", "missing")
    too_many = api.post("/instances/batch", json={"instances": [{"sequence": name}] * 1001})
    assert_error(too_many, 422, "invalid", "1000")
    assert_error(api.post("/instances/batch", json={"instances": []}), 422, "invalid")
    assert_error(api.post("/instances/batch", json=[{"sequence": name}]), 422, "invalid")
    assert_error(api.post("/instances/batch", json={"instances": [], "x": 1}), 422, "invalid")
    assert instances_of(node, name) == 3


def test_run_at_with_an_offset_postgresql_refuses_is_kept_as_its_moment(
        api: httpx.Client, node: Node, name: str) -> None:
    """ISO 8601 allows offsets up to 23:59, PostgreSQL's input only up to 15:59: a batch
    (whose moments travel as text) failed with a 500 on "+17:04"."""
    make_sequence(api, name)
    moment = "2100-02-12T05:28:19+17:04"  # 2100-02-11T12:24:19Z
    one = start(api, name, run_at=moment)
    batch = api.post("/instances/batch", json={"instances": [{"sequence": name, "run_at": moment}]})
    assert batch.status_code == 201, batch.text
    ids = [one, batch.json()["instances"][0]["id"]]
    for instance in ids:
        assert count(node, "SELECT count(*) FROM instances WHERE id = %s AND next_fire_at = "
                     "'2100-02-11T12:24:19Z'", instance) == 1


def test_get_instance_errors(api: httpx.Client) -> None:
    assert_error(api.get("/instances/not-a-uuid"), 404, "not_found")
    missing = uuid.uuid4()
    assert_error(api.get(f"/instances/{missing}"), 404, "not_found", str(missing))
    assert_error(api.post(f"/instances/{missing}/cancel"), 404, "not_found")
    assert_error(api.post(f"/instances/{missing}/retry"), 404, "not_found")
    assert_error(api.post("/instances/12/cancel"), 404, "not_found")


def test_list_filters_and_pages(api: httpx.Client, name: str) -> None:
    other_name = f"{name}-other"
    make_sequence(api, name)
    make_sequence(api, other_name)
    key = f"key-{name}"
    keyed = [start(api, name, concurrency_key=key, max_concurrency=1, delay_ms=LATER)
             for _ in range(2)]
    plain = [start(api, name, delay_ms=LATER) for _ in range(3)]
    other = start(api, other_name, delay_ms=LATER)
    assert api.post(f"/instances/{plain[0]}/cancel").status_code == 200

    def ids(**params: object) -> list[str]:
        page = api.get("/instances", params=params)
        assert page.status_code == 200, page.text
        return [item["id"] for item in page.json()["instances"]]

    mine = [*reversed(plain), *reversed(keyed)]
    assert ids(sequence=name) == mine
    assert ids(sequence=other_name) == [other]
    assert ids(concurrency_key=key) == list(reversed(keyed))
    assert ids(sequence=name, state="cancelled") == [plain[0]]
    assert ids(sequence=name, state="scheduled") == [plain[2], plain[1], *reversed(keyed)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"sequence": name, "limit": 2}
        page = api.get("/instances", params=params | ({"before": cursor} if cursor else {}))
        seen += [item["id"] for item in page.json()["instances"]]
        cursor = page.json()["next"]
        if cursor is None:
            break
    assert seen == mine


@pytest.mark.parametrize("params", [
    {"state": "sleeping"}, {"before": "yesterday"}, {"limit": 0}, {"limit": 1001},
    {"limit": "ten"}, {"limit": "9" * 40}, {"limit": "-1"}, {"colour": "red"},
    {"sequence": "bad name!"}, {"concurrency_key": "a\x00b"}, {"concurrency_key": ""},
])
def test_list_refuses_bad_parameters(api: httpx.Client, params: dict) -> None:
    for path in ("/instances", "/instances/dlq"):
        if path.endswith("dlq") and "state" in params:
            continue
        response = api.get(path, params=params)
        assert response.status_code in (400, 422), response.text
        assert set(response.json()) == {"error", "detail"}


def test_cancel(api: httpx.Client, name: str) -> None:
    make_sequence(api, name)
    waiting = start(api, name, delay_ms=LATER)
    cancelled = api.post(f"/instances/{waiting}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert api.get(f"/instances/{waiting}").json()["state"] == "cancelled"
    assert_error(api.post(f"/instances/{waiting}/cancel"), 409, "conflict", "cancelled")
    assert_error(api.post(f"/instances/{waiting}/retry"), 409, "conflict", "cancelled")
    done = start(api, name)
    wait_for(api, done)
    assert_error(api.post(f"/instances/{done}/cancel"), 409, "conflict", "completed")


def test_dead_letter_and_retry(api: httpx.Client, name: str) -> None:
    make_sequence(api, name, [{"id": "boom", "handler": "fail",
                               "params": {"message": "no luck", "retryable": False}}])
    doomed = start(api, name)
    failed = wait_for(api, doomed)
    assert failed["state"] == "failed" and "no luck" in failed["last_error"]
    dead = api.get("/instances/dlq", params={"sequence": name}).json()
    assert [item["id"] for item in dead["instances"]] == [doomed]
    retried = api.post(f"/instances/{doomed}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["attempt"] == 0 and retried.json()["finished_at"] is None
    again = wait_for(api, doomed)  # it runs again, and fails again
    assert again["state"] == "failed" and again["finished_at"] > failed["finished_at"]
    assert_error(api.post(f"/instances/{start(api, name, delay_ms=LATER)}/retry"), 409,
                 "conflict", "scheduled")


def test_queue_depth(api: httpx.Client, name: str) -> None:
    make_sequence(api, name)
    blocker_name = f"{name}-blocker"
    make_sequence(api, blocker_name, [{"id": "nap", "handler": "sleep",
                                       "params": {"ms": 3000}}])
    wait_until_queue_empty(api)
    blocker = start(api, blocker_name, priority="critical")
    wait_for(api, blocker, ("running",))  # the node's one slot is now busy
    queued = [start(api, name, priority=priority)
              for priority in ("low", "high", "high", "critical")]
    start(api, name, delay_ms=LATER)  # not due: not in the queue
    assert api.get("/queue").json() == {
        "due": 4, "by_priority": {"low": 1, "normal": 0, "high": 2, "critical": 1}}
    for instance_id in queued:  # and the queue drains once the slot is free
        assert wait_for(api, instance_id)["state"] == "completed"
    assert api.get("/queue").json()["due"] == 0


def wait_until_queue_empty(api: httpx.Client, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while api.get("/queue").json()["due"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_unknown_routes_and_methods(api: httpx.Client) -> None:
    assert_error(api.get("/nowhere"), 404, "not_found")
    response = api.delete("/queue")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]
    assert_error(api.get("/instances/batch"), 405, "method_not_allowed")
    assert_error(api.put("/sequences", json={}), 405, "method_not_allowed")
