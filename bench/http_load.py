"""HTTP load on real nodes over loopback: throughput, latency and refusals of POST /instances.

Compares, interleaved (A B A B ...), one node serving the API from one process against the
same worker count split over two nodes (two API processes on one database, the load split
between their ports): what several API processes (SO_REUSEPORT, or the API in the workers)
would buy. A third system, one process with the two nodes' pool size, tells whether it is
the process or its database connections that limit. Clients keep one connection each and
honour `Retry-After` after a 503. The load generator is a bare asyncio HTTP/1.1 client (no
parsing beyond the status line and Content-Length) so its own cost stays small; it still
shares the machine's cores with the node, which the figures include. The supervisor's CPU
per answered request is the figure the machine's load disturbs least. Needs the test extra (psutil).

    .venv/bin/python bench/http_load.py --seconds 8 --runs 3 --connections 64 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _common import drop_database, scratch_database, server_dsn

from orch8.config import Settings

REPO = Path(__file__).resolve().parent.parent
SUPERVISOR = str(Path(sys.executable).with_name("orch8-supervisor"))
SEQUENCE = b'{"name":"load","steps":[{"id":"one","handler":"noop"}]}'
BODY = b'{"sequence":"load"}'


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # of 2xx answers
    refusal_latencies: list[float] = field(default_factory=list)

    def record(self, status: int, seconds: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        (self.latencies if status < 300 else self.refusal_latencies).append(seconds)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_node(dsn: str, workers: int, pool: int, log_dir: Path
               ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCH8_")}
    environ |= {"DATABASE_URL": dsn, "ORCH8_BIND": f"127.0.0.1:{port}",
                "ORCH8_WORKERS": str(workers), "ORCH8_LOG_LEVEL": "WARNING",
                "ORCH8_API_POOL_SIZE": str(pool)}
    log = (log_dir / f"node-{port}.log").open("wb")
    process = subprocess.Popen([SUPERVISOR], env=environ, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready",
                                            timeout=1):
                    return process, port
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"node on {port} did not become ready; see {log.name}")
    except BaseException:  # interrupted or failed: leave nothing running
        process.kill()
        process.wait()
        raise


def stop_node(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def request(port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response: its status, and whether the server closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), b"connection: close" in head.lower()


async def connection(port: int, until: float, tally: Tally) -> None:
    payload = request(port, "/instances", BODY)
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.monotonic() < until:
        try:
            if reader is None or writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(payload)
            status, closing = await answer(reader)
        except (OSError, asyncio.IncompleteReadError):
            tally.errors += 1
            closing, status = True, 0
        else:
            tally.record(status, time.monotonic() - started)
        if closing and writer is not None:
            writer.close()
            reader = writer = None
        if status == 503:  # a well-behaved client honours Retry-After (1 s)
            await asyncio.sleep(min(1.0, max(0.0, until - time.monotonic())))
    if writer is not None:
        writer.close()


async def load(ports: list[int], connections: int, seconds: float) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    await asyncio.gather(*(connection(ports[n % len(ports)], until, tally)
                           for n in range(connections)))
    return tally


def one_run(server: str, layout: list[tuple[int, int]], connections: int, seconds: float,
            log_dir: Path) -> dict[str, float]:
    dsn = scratch_database(server)
    nodes: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for workers, pool in layout:
            nodes.append(start_node(dsn, workers, pool, log_dir))
        port = nodes[0][1]
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/sequences", SEQUENCE,
            {"Content-Type": "application/json"}), timeout=10).close()
        supervisors = [psutil.Process(process.pid) for process, _ in nodes]
        cpu_before = sum(_cpu_seconds(supervisor) for supervisor in supervisors)
        tally = asyncio.run(load([port for _, port in nodes], connections, seconds))
        cpu_used = sum(_cpu_seconds(supervisor) for supervisor in supervisors) - cpu_before
    finally:
        for process, _ in nodes:
            stop_node(process)
        drop_database(server, dsn)
    ok = tally.statuses.get(201, 0)
    latencies = sorted(tally.latencies) or [0.0]
    refusals = sorted(tally.refusal_latencies) or [0.0]
    answered = len(tally.latencies) + len(tally.refusal_latencies)
    return {"created_per_s": ok / seconds, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "refused_503": tally.statuses.get(503, 0),
            "refusal_p99_ms": 1000 * refusals[int(len(refusals) * 0.99)], "other": sum(
                count for status, count in tally.statuses.items() if status not in (201, 503)),
            "transport_errors": tally.errors,
            # The API's own cost, which the machine's load hardly changes: supervisor CPU
            # (the API, heartbeat and pipes) per answered request.
            "supervisor_cpu_ms_per_request": 1000 * cpu_used / max(1, answered)}


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    server = server_dsn()
    half = max(1, args.workers // 2)
    pool = Settings.api_pool_size
    systems = {f"1 process pool {pool}": [(args.workers, pool)],
               f"2 processes pool {pool}": [(half, pool)] * 2,
               f"1 process pool {2 * pool}": [(args.workers, 2 * pool)]}
    log_dir = Path(tempfile.mkdtemp(prefix="orch8-http-load-"))
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for run in range(args.runs):
        for connections in args.connections:
            for name, layout in systems.items():  # interleaved: A B A B
                figures = one_run(server, layout, connections, args.seconds, log_dir)
                results.setdefault((name, connections), []).append(figures)
                print(f"run {run + 1} {name:20} c={connections:<5} {json.dumps(figures)}",
                      flush=True)
    print("\nmedian (min-max) over runs")
    for (name, connections), runs in results.items():
        shown = []
        for key in runs[0]:
            values = [figures[key] for figures in runs]
            shown.append(f"{key} {statistics.median(values):.3g} "
                         f"({min(values):.3g}-{max(values):.3g})")
        print(f"{name:20} c={connections:<5} " + ", ".join(shown))


if __name__ == "__main__":
    main()
