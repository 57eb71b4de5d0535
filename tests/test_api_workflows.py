"""The workflow endpoints over real HTTP: each one's success and error paths."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from api_helpers import Served, serve_node

STEPS = [{"id": "a", "handler": "noop", "params": {"x": 1}}]


@pytest.fixture
def api(dsn: str) -> Iterator[httpx.Client]:
    with serve_node(dsn) as served, served.client() as client:
        yield client


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (fixed)
        assert row is not None
        return int(row[0])


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    for fragment in fragments:
        assert fragment in body["detail"]


def make_sequence(api: httpx.Client, name: str = "hello", steps: list | None = None) -> dict:
    response = api.post("/sequences", json={"name": name, "steps": steps or STEPS})
    assert response.status_code == 201, response.text
    return response.json()


def start(api: httpx.Client, **body: object) -> str:
    response = api.post("/instances", json={"sequence": "hello", **body})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


# --- sequences ---------------------------------------------------------------------------

def test_sequence_versions_and_reads(api: httpx.Client) -> None:
    first = make_sequence(api)
    second = make_sequence(api, steps=[{"id": "b", "handler": "log"}])
    assert (first["version"], second["version"]) == (1, 2)
    assert api.get("/sequences/hello").json()["version"] == 2
    assert api.get("/sequences/hello", params={"version": 1}).json()["steps"][0]["id"] == "a"
    listed = api.get("/sequences").json()["sequences"]
    assert [(item["name"], item["version"]) for item in listed] == [("hello", 2)]
    assert_error(api.get("/sequences/hello", params={"version": 3}), 404, "not_found",
                 "hello version 3")
    assert_error(api.get("/sequences/nope"), 404, "not_found", "nope")
    assert_error(api.get("/sequences/hello", params={"version": "x"}), 400, "bad_request")


@pytest.mark.parametrize(("body", "status", "code", "fragment"), [
    ({"name": "s", "steps": STEPS, "extra": 1}, 422, "invalid", "extra: unknown field"),
    ({"name": "s", "steps": []}, 422, "invalid", "steps"),
    ({"name": "bad name!", "steps": STEPS}, 422, "invalid", "name"),
    ({"name": "s", "steps": [{"id": "a", "handler": "noop", "retry": {"max_attempts": "3"}}]},
     422, "invalid", "steps[0].retry.max_attempts"),
    ({"name": "s", "steps": [{"id": "a", "handler": "noop", "delay_ms": 10**15}]},
     422, "invalid", "steps[0].delay_ms"),
    ([1, 2], 422, "invalid", "body"),
])
def test_sequence_refused(api: httpx.Client, dsn: str, body: object, status: int, code: str,
                          fragment: str) -> None:
    assert_error(api.post("/sequences", json=body), status, code, fragment)
    assert count(dsn, "sequences") == 0


def test_malformed_unsupported_and_oversized_bodies(api: httpx.Client, dsn: str) -> None:
    json_type = {"Content-Type": "application/json"}
    assert_error(api.post("/sequences", content=b'{"name": ', headers=json_type), 400,
                 "bad_request", "malformed JSON")
    assert_error(api.post("/instances", content=b'{"sequence": "hello", "delay_ms": '
                          + b"9" * 40 + b"}", headers=json_type), 422, "invalid", "delay_ms")
    assert_error(api.post("/sequences", content=b"name=x", headers={
        "Content-Type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type")
    huge = b'{"name": "s", "steps": [], "pad": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    assert_error(api.post("/sequences", content=huge, headers=json_type), 413,
                 "payload_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 100_000

    try:
        response = api.post("/instances", content=chunks(), headers=json_type)
    except httpx.RemoteProtocolError:
        pass  # the server answered 413 and closed while the client was still sending
    else:
        assert_error(response, 413, "payload_too_large")
    assert count(dsn, "sequences") == 0 and count(dsn, "instances") == 0


# --- instances ---------------------------------------------------------------------------

def test_create_instance_and_idempotency(api: httpx.Client, dsn: str) -> None:
    make_sequence(api)
    body = {"sequence": "hello", "input": {"n": 1}, "idempotency_key": "order-7",
            "priority": "high", "concurrency_key": "acct-1", "max_concurrency": 2}
    first = api.post("/instances", json=body)
    assert first.status_code == 201 and first.json()["deduplicated"] is False
    again = api.post("/instances", json=body)
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "deduplicated": True}
    instance = api.get(f"/instances/{first.json()['id']}").json()
    assert instance["state"] == "scheduled" and instance["priority"] == "high"
    assert instance["input"] == {"n": 1} and instance["concurrency_key"] == "acct-1"
    assert instance["outputs"] == {} and instance["last_error"] is None
    assert count(dsn, "instances") == 1


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"sequence": "nope"}, 404, "nope"),
    ({"sequence": "hello", "version": 9}, 404, "version 9"),
    ({"sequence": "hello", "input": [1]}, 422, "input"),
    ({"sequence": "hello", "priority": 5}, 422, "priority"),
    ({"sequence": "hello", "delay_ms": "soon"}, 422, "delay_ms"),
    ({"sequence": "hello", "delay_ms": 10**17}, 422, "delay_ms"),
    ({"sequence": "hello", "delay_ms": -1}, 422, "delay_ms"),
    ({"sequence": "hello", "run_at": "yesterday"}, 422, "run_at"),
    ({"sequence": "hello", "max_concurrency": 2}, 422, "max_concurrency"),
    ({"sequence": "hello", "colour": "red"}, 422, "colour: unknown field"),
    ({"sequence": "hello", "input": {"text": "a\u0000b"}}, 422, "U+0000"),
    ({"sequence": 7}, 422, "sequence"),
    ("hello", 422, "body"),
])
def test_create_instance_refused(api: httpx.Client, dsn: str, body: object, status: int,
                                 fragment: str) -> None:
    make_sequence(api)
    response = api.post("/instances", json=body)
    assert_error(response, status, "not_found" if status == 404 else "invalid", fragment)
    assert count(dsn, "instances") == 0


def test_batch_is_all_or_nothing(api: httpx.Client, dsn: str) -> None:
    make_sequence(api)
    good = api.post("/instances/batch", json={"instances": [
        {"sequence": "hello", "input": {"n": n}} for n in range(3)]})
    assert good.status_code == 201, good.text
    ids = [item["id"] for item in good.json()["instances"]]
    assert [api.get(f"/instances/{i}").json()["input"]["n"] for i in ids] == [0, 1, 2]
    invalid = api.post("/instances/batch", json={"instances": [
        {"sequence": "hello"}, {"sequence": "hello", "priority": "urgent"}]})
    assert_error(invalid, 422, "invalid", "instances[1].priority")
    unknown = api.post("/instances/batch", json={"instances": [
        {"sequence": "hello"}, {"sequence": "missing"}]})
    assert_error(unknown, 404, "not_found", "missing")
    too_many = api.post("/instances/batch", json={"instances": [{"sequence": "hello"}] * 1001})
    assert_error(too_many, 422, "invalid", "1000")
    assert_error(api.post("/instances/batch", json={"instances": []}), 422, "invalid")
    assert_error(api.post("/instances/batch", json=[{"sequence": "hello"}]), 422, "invalid")
    assert count(dsn, "instances") == 3


def test_get_instance_errors(api: httpx.Client) -> None:
    assert_error(api.get("/instances/not-a-uuid"), 404, "not_found")
    missing = uuid.uuid4()
    assert_error(api.get(f"/instances/{missing}"), 404, "not_found", str(missing))
    assert_error(api.post(f"/instances/{missing}/cancel"), 404, "not_found")
    assert_error(api.post(f"/instances/{missing}/retry"), 404, "not_found")
    assert_error(api.post("/instances/12/cancel"), 404, "not_found")


def test_list_filters_and_pages(api: httpx.Client) -> None:
    make_sequence(api)
    make_sequence(api, "other")
    keyed = [start(api, concurrency_key="k", max_concurrency=1) for _ in range(2)]
    plain = [start(api) for _ in range(3)]
    other = api.post("/instances", json={"sequence": "other"}).json()["id"]
    api.post(f"/instances/{plain[0]}/cancel")

    def ids(**params: object) -> list[str]:
        return [item["id"] for item in api.get("/instances", params=params).json()["instances"]]

    everything = [other, *reversed(plain), *reversed(keyed)]
    assert ids() == everything
    assert ids(sequence="other") == [other]
    assert ids(concurrency_key="k") == list(reversed(keyed))
    assert ids(state="cancelled") == [plain[0]]
    seen, cursor = [], None
    while True:
        page = api.get("/instances", params={"limit": 2, **({"before": cursor} if cursor
                                                            else {})}).json()
        seen += [item["id"] for item in page["instances"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == everything


@pytest.mark.parametrize("params", [
    {"state": "sleeping"}, {"before": "yesterday"}, {"limit": 0}, {"limit": 1001},
    {"limit": "ten"}, {"limit": "9" * 40}, {"colour": "red"}, {"sequence": "bad name!"},
])
def test_list_refuses_bad_parameters(api: httpx.Client, params: dict) -> None:
    response = api.get("/instances", params=params)
    assert response.status_code in (400, 422), response.text
    assert set(response.json()) == {"error", "detail"}


def test_cancel_and_retry(api: httpx.Client, dsn: str) -> None:
    make_sequence(api)
    first, second = start(api), start(api)
    cancelled = api.post(f"/instances/{first}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert_error(api.post(f"/instances/{first}/cancel"), 409, "conflict", "cancelled")
    assert_error(api.post(f"/instances/{second}/retry"), 409, "conflict", "scheduled")
    with psycopg.connect(dsn) as conn:  # dead-letter one as the engine would
        conn.execute("UPDATE instances SET state = 'failed', last_error = 'boom', "
                     "finished_at = now() WHERE id = %s", (second,))
    dead = api.get("/instances/dlq").json()
    assert [item["id"] for item in dead["instances"]] == [second]
    assert dead["instances"][0]["last_error"] == "boom"
    retried = api.post(f"/instances/{second}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "scheduled"
    assert api.get("/instances/dlq").json() == {"instances": [], "next": None}


def test_queue_depth(api: httpx.Client) -> None:
    make_sequence(api)
    for priority in ("low", "high", "high", "critical"):
        start(api, priority=priority)
    start(api, delay_ms=3_600_000)  # not due yet
    assert api.get("/queue").json() == {
        "due": 4, "by_priority": {"low": 1, "normal": 0, "high": 2, "critical": 1}}


def test_unknown_routes_and_methods(api: httpx.Client) -> None:
    assert_error(api.get("/nowhere"), 404, "not_found")
    response = api.delete("/queue")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]
    assert_error(api.get("/instances/batch"), 405, "method_not_allowed")
    assert_error(api.put("/sequences", json={}), 405, "method_not_allowed")
