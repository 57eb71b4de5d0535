"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright).

One node with a token serves the page; the test signs in, watches a second node appear
without a reload, drains it with its button, retries a dead-lettered instance, and saves
a screenshot of each state under `test-artifacts/ui/` (or `$ORCH8_TEST_ARTIFACTS/ui`).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from api_helpers import Node, database, running_node, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="needs Debian's chromium package (scripts/setup installs it as root)")

TOKEN = "ui-browser-tok-55e0a9"
ARTIFACTS = Path(os.environ.get("ORCH8_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts")) / "ui"
# Flags for a machine without a display or outside network (and, in CI, as root).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def cluster_db(server_dsn: str, template_name: str) -> Iterator[str]:
    with database(server_dsn, template_name) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def first(cluster_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(cluster_db, tmp_path_factory.mktemp("ui-first"), token=TOKEN) as node:
        yield node


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def shot(page: object, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def signed_in_page(browser: object, node: Node) -> object:
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page.goto(node.url + "/ui")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector(f'tr[data-node="{node.node_id}"]', timeout=WAIT_MS)
    return page


def test_sign_in_asks_for_the_token(browser: object, first: Node) -> None:
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(first.url + "/")
    assert page.url.endswith("/ui/login")
    shot(page, "1-login")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    page.wait_for_selector("#login-failed", timeout=WAIT_MS)
    shot(page, "2-login-refused")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector(f'tr[data-node="{first.node_id}"]', timeout=WAIT_MS)
    assert page.url.endswith("/ui")
    cookies = page.context.cookies()
    assert [c["httpOnly"] for c in cookies if c["name"] == "orch8_ui"] == [True]
    assert TOKEN not in page.content()
    page.close()


def test_second_node_appears_and_drains(browser: object, first: Node, cluster_db: str,
                                        tmp_path: Path) -> None:
    page = signed_in_page(browser, first)
    with running_node(cluster_db, tmp_path, token=TOKEN) as second:
        row = f'tr[data-node="{second.node_id}"]'
        # The page refreshes itself: no reload between the start and the row.
        page.wait_for_selector(row, timeout=WAIT_MS)
        assert page.inner_text(f"{row} td.state") == "active"
        shot(page, "3-two-nodes")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click(f"{row} button[data-action=drain]")
        page.wait_for_selector("#flash:has-text('drain requested')", timeout=WAIT_MS)
        assert second.process.wait(30) == 0
        with first.client() as api:
            listed = [n["id"] for n in api.get("/cluster/nodes").json()]
        assert second.node_id not in listed
        page.wait_for_selector(row, state="detached", timeout=WAIT_MS)
        shot(page, "4-drained")
    page.close()


def test_dead_letter_retry(browser: object, first: Node) -> None:
    sequence = f"ui-dlq-{uuid.uuid4().hex[:6]}"
    with first.client() as api:
        api.post("/sequences", json={"name": sequence, "steps": [
            {"id": "charge", "handler": "fail",
             "params": {"message": "card declined", "retryable": False}}]}).raise_for_status()
        started = api.post("/instances", json={"sequence": sequence, "input": {}}).json()
        wait_for(api, started["id"], ("failed",))
    page = signed_in_page(browser, first)
    row = f'#dead-letter tr[data-instance="{started["id"]}"]'
    page.wait_for_selector(row, timeout=WAIT_MS)
    assert "card declined" in page.inner_text(row)
    shot(page, "5-dead-letter")
    page.click(f"{row} button[data-action=retry]")
    page.wait_for_selector("#flash:has-text('sent back to the queue')", timeout=WAIT_MS)
    # Retried: the epoch rose for the retry and again for the new claim.
    deadline = time.monotonic() + 30
    with psycopg.connect(first.dsn, autocommit=True) as conn:
        while True:
            row_ = conn.execute("SELECT claim_epoch FROM instances WHERE id = %s",
                                (started["id"],)).fetchone()
            assert row_ is not None
            if row_[0] >= 3:
                break
            assert time.monotonic() < deadline, f"not run again (epoch {row_[0]})"
            conn.execute("SELECT pg_sleep(0.05)")
    page.fill("#instance-id", started["id"])
    page.click("#lookup button[type=submit]")
    page.wait_for_selector("#instance-steps", timeout=WAIT_MS)
    assert "charge" in page.inner_text("#instance-steps")
    shot(page, "6-instance")
    page.close()
