"""The dashboard over plain HTTP: security headers, escaping, sessions, CSRF, actions.

The browser-driven checks (live refresh, buttons, screenshots) are in test_ui_browser.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from api_helpers import Node, database, running_node, wait_for

TOKEN = "ui-tok-8c1d5e02b7"
HOSTILE = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def open_node(server_dsn: str, template_name: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A loopback node without a token."""
    with database(server_dsn, template_name) as dsn, running_node(
            dsn, tmp_path_factory.mktemp("ui-open")) as node:
        yield node


@pytest.fixture(scope="module")
def token_node(server_dsn: str, template_name: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with database(server_dsn, template_name) as dsn, running_node(
            dsn, tmp_path_factory.mktemp("ui-token"), token=TOKEN) as node:
        yield node


def csrf_of(page: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page)
    assert found, page[:500]
    return found.group(1)


def test_root_redirects_and_page_is_locked_down(open_node: Node) -> None:
    with httpx.Client(base_url=open_node.url) as browser:
        assert browser.get("/").headers["location"] == "/ui"
        page = browser.get("/ui")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
        # No inline script or style anywhere: the policy would block them.
        assert "<script>" not in page.text and "style=" not in page.text
        assert open_node.node_id in page.text
        assert browser.get("/ui/static/ui.js").status_code == 200


def test_values_are_escaped(open_node: Node) -> None:
    sequence = f"ui-esc-{uuid.uuid4().hex[:6]}"
    with open_node.client() as api:
        api.post("/sequences", json={"name": sequence, "steps": [
            {"id": "boom", "handler": "fail",
             "params": {"message": HOSTILE, "retryable": False}}]}).raise_for_status()
        started = api.post("/instances", json={"sequence": sequence,
                                                "input": {"note": HOSTILE}}).json()
        wait_for(api, started["id"], ("failed",))
    with httpx.Client(base_url=open_node.url) as browser:
        panels = browser.get("/ui/panels").text
        detail = browser.get(f"/ui/instances/{started['id']}").text
    for html in (panels, detail):
        assert HOSTILE not in html
        assert "&lt;script&gt;" in html
    assert started["id"] in panels  # the dead letter lists it


def test_instance_lookup_refuses_bad_ids(open_node: Node) -> None:
    with httpx.Client(base_url=open_node.url) as browser:
        bad = browser.get("/ui/instances/not-a-uuid")
        missing = browser.get(f"/ui/instances/{uuid.uuid4()}")
    assert bad.status_code == 400 and "not an instance id" in bad.text
    assert missing.status_code == 404 and "no instance" in missing.text


def test_actions_need_the_csrf_token(open_node: Node) -> None:
    with httpx.Client(base_url=open_node.url) as browser:
        csrf = csrf_of(browser.get("/ui").text)
        path = f"/ui/nodes/{open_node.node_id}-nobody/drain"
        refused = browser.post(path)
        forged = browser.post(path, headers={"X-CSRF-Token": "0" * 64})
        accepted = browser.post(path, headers={"X-CSRF-Token": csrf})
    assert refused.status_code == forged.status_code == 403
    assert refused.json()["error"] == "forbidden"
    # The token got past CSRF; the node id is unknown, so the store says 404.
    assert accepted.status_code == 404 and accepted.json()["error"] == "not_found"
    # Without the session cookie the CSRF token alone is worth nothing.
    lone = httpx.post(open_node.url + path, headers={"X-CSRF-Token": csrf})
    assert lone.status_code == 401


def test_retry_from_the_dead_letter(open_node: Node) -> None:
    sequence = f"ui-retry-{uuid.uuid4().hex[:6]}"
    with open_node.client() as api:
        api.post("/sequences", json={"name": sequence, "steps": [
            {"id": "boom", "handler": "fail", "params": {"retryable": False}}]}
        ).raise_for_status()
        started = api.post("/instances", json={"sequence": sequence, "input": {}}).json()
        wait_for(api, started["id"], ("failed",))
        with httpx.Client(base_url=open_node.url) as browser:
            csrf = csrf_of(browser.get("/ui").text)
            answer = browser.post(f"/ui/instances/{started['id']}/retry",
                                  headers={"X-CSRF-Token": csrf})
            again = browser.post(f"/ui/instances/{started['id']}/retry",
                                 headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 200, answer.text
        with psycopg.connect(open_node.dsn) as conn:
            row = conn.execute("SELECT claim_epoch FROM instances WHERE id = %s",
                               (started["id"],)).fetchone()
        assert row is not None and row[0] >= 2  # claimed, then bumped by the retry
        # It ran again (and failed again) or is about to: either way not a 5xx.
        assert again.status_code in (200, 409)


def test_token_flow(token_node: Node) -> None:
    with httpx.Client(base_url=token_node.url) as browser:
        first = browser.get("/ui")
        assert first.status_code == 303 and first.headers["location"] == "/ui/login"
        assert browser.get("/ui/panels").status_code == 401
        form = browser.get("/ui/login")
        assert form.status_code == 200 and 'name="token"' in form.text
        wrong = browser.post("/ui/login", data={"token": TOKEN + "x"})
        assert wrong.status_code == 401 and "not right" in wrong.text
        assert "set-cookie" not in wrong.headers
        right = browser.post("/ui/login", data={"token": TOKEN})
        assert right.status_code == 303 and right.headers["location"] == "/ui"
        cookie = right.headers["set-cookie"]
        assert TOKEN not in cookie and "HttpOnly" in cookie
        page = browser.get("/ui")
        assert page.status_code == 200 and token_node.node_id in page.text
        assert TOKEN not in page.text
        # The cookie opens the dashboard, never the JSON API.
        assert browser.get("/instances").status_code == 401
        browser.post("/ui/logout")
        assert browser.get("/ui").status_code == 303
    # A forged cookie is refused.
    forged = httpx.get(token_node.url + "/ui/panels",
                       cookies={"orch8_ui": "abc.1.deadbeef"})
    assert forged.status_code == 401
    assert TOKEN not in token_node.output()


def test_panel_queries_stay_bounded_on_a_large_history(conn: psycopg.Connection) -> None:
    """Every query the panels run reads a bounded number of pages, however long the
    history: 200,000 finished and 20,000 future instances here, far more pages than that."""
    from orch8.model import State
    from orch8.store import concurrency, instances, nodes, rate_limits

    conn.execute("INSERT INTO sequences (name, version, steps) VALUES ('big', 1, '[]')")
    conn.execute("""
        INSERT INTO instances (id, sequence_name, sequence_version, state, next_fire_at,
                               finished_at, last_error)
        SELECT gen_random_uuid(), 'big', 1,
               CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'completed' END,
               now() - interval '1 hour', now(), 'boom'
        FROM generate_series(1, 200000) g""")
    conn.execute("""
        INSERT INTO instances (id, sequence_name, sequence_version, priority, next_fire_at)
        SELECT gen_random_uuid(), 'big', 1, g % 4, now() + interval '3 hours'
        FROM generate_series(1, 20000) g""")
    conn.execute("ANALYZE instances")
    table_pages = conn.execute(
        "SELECT relpages FROM pg_class WHERE relname = 'instances'").fetchone()
    assert table_pages is not None and table_pages[0] > 3000
    for query in (nodes.list_nodes(), instances.queue_depth(), instances.oldest_due_age(),
                  instances.list_instances(state=State.FAILED, limit=10),
                  rate_limits.list_rate_limits(), concurrency.busy_keys(),
                  nodes.node_totals()):
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query.sql,
                            query.params).fetchone()
        assert plan is not None
        top = plan[0][0]["Plan"]
        buffers = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
        assert buffers < 300, (query.sql, buffers)
