"""`enqueue`: instances created per second by `Client.start_many`, by
`POST /instances/batch`, and by single `POST /instances` requests from concurrent clients,
beside pgqueuer's list enqueue. The instances are due in a day, so the node's workers stay
idle and only the creation is measured. Each system's connection has created one instance
before its clock starts (pgqueuer's asyncpg reads its types then; the others' connections
and statements are set up), so what is timed is a producer's steady rate."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench import engine, peer
from bench.cases import Context
from bench.engine import NodeSettings
from bench.runs import Case, Figure, Run, interleave
from orch8 import Client

CHUNK = 1000  # the HTTP batch limit; start_many is given the same chunks
CLIENTS = 8
DELAY_MS = 24 * 3600 * 1000  # due in a day: the workers stay idle


def measure(context: Context) -> Run:
    count, singles = context.size(20_000, 1_000), context.size(2_000, 200)
    run = Run("enqueue", context.reps, settings={"instances": count, "single_requests": singles,
                                                 "clients": CLIENTS, "chunk": CHUNK})
    with context.server.database() as dsn, context.server.database(migrated=False) as peer_dsn:
        body = {"sequence": engine.new_sequence(dsn), "input": {}, "delay_ms": DELAY_MS}
        peer.install(peer_dsn)
        with engine.started(dsn, NodeSettings(workers=2)) as nodes:
            engine.ready(nodes)
            url = nodes[0].url
            interleave(run, [
                Case("Client.start_many", lambda: _start_many(dsn, body, count)),
                Case("POST /instances/batch", lambda: _batch_http(url, body, count)),
                Case(f"POST /instances, {CLIENTS} clients",
                     lambda: _single_http(url, body, singles)),
                Case("pgqueuer enqueue", lambda: peer.enqueue(peer_dsn, count)),
            ])
    run.summary = {"start_many_per_s": run.stats("Client.start_many")["median"],
                   "batch_http_per_s": run.stats("POST /instances/batch")["median"],
                   "single_http_per_s": run.stats(f"POST /instances, {CLIENTS} clients")["median"],
                   "pgqueuer_enqueue_per_s": run.stats("pgqueuer enqueue")["median"],
                   "ratio_start_many_pgqueuer": run.ratio("Client.start_many",
                                                          "pgqueuer enqueue")["median"]}
    return run


def _timed(count: int, work: Any) -> Figure:
    started = time.perf_counter()
    work()
    return Figure(count=count, completed=count, seconds=time.perf_counter() - started,
                  complete=True)


def _start_many(dsn: str, body: dict[str, Any], count: int) -> Figure:
    with Client(dsn) as client:
        client.start_many([body])
        return _timed(count, lambda: [client.start_many([body] * min(CHUNK, count - first))
                                      for first in range(0, count, CHUNK)])


def _batch_http(url: str, body: dict[str, Any], count: int) -> Figure:
    def send(http: httpx.Client) -> None:
        for first in range(0, count, CHUNK):
            chunk = {"instances": [body] * min(CHUNK, count - first)}
            http.post("/instances/batch", json=chunk).raise_for_status()

    with httpx.Client(base_url=url, timeout=60) as http:
        http.post("/instances/batch", json={"instances": [body]}).raise_for_status()
        return _timed(count, lambda: send(http))


def _single_http(url: str, body: dict[str, Any], count: int) -> Figure:
    def client(share: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(share):
                http.post("/instances", json=body).raise_for_status()

    shares = [count // CLIENTS + (1 if n < count % CLIENTS else 0) for n in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        return _timed(count, lambda: list(pool.map(client, shares)))


def plot(run: Run) -> list[tuple[str, Any]]:
    return []
