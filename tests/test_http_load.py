"""A real node under HTTP load over loopback: it stays ready, refuses early, drains cleanly.

The node gets small limits (8 requests in progress, a 5 s read timeout) so a few dozen
requests overload it. Holding `sequences` locked from the test makes every admitted
POST /instances wait inside the database, so which requests are admitted and which are
refused is decided by the node's limits, not by timing. Figures (throughput, p99,
refusal rates) live in `bench/http_load.py`, never here.
"""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from api_helpers import Node, database, running_node

# The read timeout leaves room for a CPU-starved machine, and is still far shorter than
# the 40 s the slow body below would take.
LIMITS = {"ORCH8_API_MAX_REQUESTS": "8", "ORCH8_API_POOL_SIZE": "8",
          "ORCH8_API_READ_TIMEOUT_SECS": "5"}
ADMITTED = 8
# Kubernetes' default probe timeout: a readiness answer slower than this counts as a
# failure to the prober, whatever its status. Not a speed target: the node's verdict.
PROBE_TIMEOUT_S = 1.0
# A client drops idle connections before the node's 5 s keep-alive timeout closes them, as
# clients should: otherwise a request sent on a connection the node is closing at that
# moment is lost in transit (on either side of the race).
KEEPALIVE_S = 2.0
SEQUENCE = {"name": "load", "steps": [{"id": "one", "handler": "noop"}]}


@pytest.fixture(scope="module")
def node(server_dsn: str, template_name: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with database(server_dsn, template_name) as dsn, running_node(
            dsn, tmp_path_factory.mktemp("node"), **LIMITS) as node:
        with node.client() as client:
            assert client.post("/sequences", json=SEQUENCE).status_code == 201
        yield node


def instance_count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM instances").fetchone()
    assert row is not None
    return int(row[0])


def locked_sequences(dsn: str) -> psycopg.Connection[Any]:
    """A connection holding `sequences` locked: every POST /instances waits behind it."""
    conn = psycopg.connect(dsn)
    conn.execute("LOCK TABLE sequences IN ACCESS EXCLUSIVE MODE")
    return conn


async def post_instances(client: httpx.AsyncClient, count: int) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(client.post("/instances", json={"sequence": "load"}))
            for _ in range(count)]


def assert_refusal(response: httpx.Response, *fragments: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == "unavailable", body
    for fragment in fragments:
        assert fragment in body["detail"], body


def test_the_excess_is_refused_at_once_and_readiness_stays_ready(node: Node) -> None:
    before = instance_count(node.dsn)
    lock = locked_sequences(node.dsn)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response]:
        limits = httpx.Limits(max_connections=100, keepalive_expiry=KEEPALIVE_S)
        async with httpx.AsyncClient(base_url=node.url, limits=limits, timeout=30) as client:
            tasks = await post_instances(client, 40)
            # The refusals come back while the admitted requests still wait on the lock.
            refused = []
            for finished in asyncio.as_completed(tasks):
                refused.append(await finished)
                if len(refused) == 40 - ADMITTED:
                    break
            ready = await client.get("/health/ready", timeout=PROBE_TIMEOUT_S)
            lock.commit()
            return refused, list(await asyncio.gather(*tasks)), ready

    try:
        refused, everything, ready = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        lock.close()
    for response in refused:
        assert_refusal(response, "busy")
    assert (ready.status_code, ready.text) == (200, "ok")
    statuses = sorted(response.status_code for response in everything)
    assert statuses == [201] * ADMITTED + [503] * (40 - ADMITTED)
    # Nothing written by a refused request.
    assert instance_count(node.dsn) == before + ADMITTED


def test_sustained_load_keeps_readiness_and_memory_bounded(node: Node) -> None:
    process = psutil.Process(node.process.pid)
    rss_before = process.memory_info().rss
    answered: list[int] = []
    probes: list[int] = []

    async def client_loop(client: httpx.AsyncClient, requests: int) -> None:
        for _ in range(requests):
            response = await client.post("/instances", json={"sequence": "load"})
            if response.status_code == 503:
                assert_refusal(response)
            else:
                assert response.status_code == 201, response.text
            answered.append(response.status_code)

    async def probe_loop(done: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=node.url, timeout=PROBE_TIMEOUT_S) as client:
            while not done.is_set():
                probes.append((await client.get("/health/ready")).status_code)
                await asyncio.sleep(0.05)  # pacing between probes, not synchronisation

    async def scenario() -> None:
        done = asyncio.Event()
        prober = asyncio.create_task(probe_loop(done))
        limits = httpx.Limits(max_connections=200, keepalive_expiry=KEEPALIVE_S)
        async with httpx.AsyncClient(base_url=node.url, limits=limits, timeout=30) as client:
            await asyncio.gather(*(client_loop(client, 10) for _ in range(100)))
        done.set()
        await prober

    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert len(answered) == 1000
    assert probes and set(probes) == {200}, probes
    # Bounded: a thousand requests, a hundred at a time, leave no lasting growth.
    growth = process.memory_info().rss - rss_before
    assert growth < 64 * 1024 * 1024, f"supervisor grew {growth / 2**20:.0f} MiB"


def test_a_slow_body_is_cut_off_by_the_read_timeout(node: Node) -> None:
    head = (b"POST /instances HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n{")
    with socket.create_connection(("127.0.0.1", int(node.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head)
        started = time.monotonic()
        # One byte every 0.2 s: each read is prompt, the body never completes.
        for _ in range(199):
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                break
            sock.sendall(b" ")
        else:
            raise AssertionError("a body sent a byte at a time was never cut off")
        answer = receive_all(sock)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"408", answer
    assert b'"error":"timeout"' in rest
    # Cut off near the 5 s limit, long before the body could have arrived (40 s).
    assert time.monotonic() - started < 30


def test_a_silent_connection_is_closed(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", int(node.url.rsplit(":", 1)[1]))) as sock:
        sock.settimeout(30)
        assert sock.recv(1024) == b""  # closed by the node's keep-alive timeout (5 s)


def test_a_client_that_goes_away_is_one_info_line(node: Node) -> None:
    before = node.output().count("client went away")
    head = (b"POST /instances HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"sequence\"")
    with socket.create_connection(("127.0.0.1", int(node.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        while sock.recv(1024):
            pass
    line = wait_for_log(node, "client went away", before)
    assert " INFO " in line
    assert "Traceback" not in node.output() and " ERROR " not in node.output()


def test_drain_under_load_answers_every_request(server_dsn: str, template_name: str,
                                                tmp_path: Path) -> None:
    with database(server_dsn, template_name) as dsn, running_node(dsn, tmp_path,
                                                                  **LIMITS) as node:
        with node.client() as client:
            assert client.post("/sequences", json=SEQUENCE).status_code == 201
        lock = locked_sequences(dsn)
        try:
            responses = asyncio.run(asyncio.wait_for(drain_while_loaded(node), 60))
        finally:
            lock.close()
        assert node.process.wait(30) == 0
        # Admitted requests were cancelled after the grace and answered; the rest were
        # refused at once; none got an empty 500 or a reset.
        for response in responses:
            assert_refusal(response)
        details = [response.json()["detail"] for response in responses]
        assert sum("shut down before answering" in d for d in details) == ADMITTED
        assert instance_count(dsn) == 0
        log = node.output()
        [closed] = [line for line in log.splitlines() if "API closed:" in line]
        assert f"{ADMITTED} cancelled" in closed
        assert "Traceback" not in log and "CancelledError" not in log


async def drain_while_loaded(node: Node) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=100, keepalive_expiry=KEEPALIVE_S)
    async with httpx.AsyncClient(base_url=node.url, limits=limits, timeout=30) as client:
        tasks = await post_instances(client, 30)
        refused = 0
        for finished in asyncio.as_completed(tasks):
            await finished
            refused += 1
            if refused == 30 - ADMITTED:
                break
        node.process.send_signal(signal.SIGTERM)
        return list(await asyncio.gather(*tasks))


def receive_all(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def wait_for_log(node: Node, text: str, seen: int, timeout_s: float = 30) -> str:
    """The one new log line with `text`, after `seen` earlier ones."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in node.output().splitlines() if text in line][seen:]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}:\n{node.output()}")

