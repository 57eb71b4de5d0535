"""HTTP load on real nodes over loopback: throughput, latency and refusals of POST /instances.

Compares, interleaved (A B A B ...), one node serving the API from one process against the
same worker count split over two nodes (two API processes on one database, the load split
between their ports): what several API processes (SO_REUSEPORT, or the API in the workers)
would buy. The load generator is a bare asyncio HTTP/1.1 client (no parsing beyond the
status line and Content-Length) so its own cost stays small; it still shares the machine's
cores with the node, which the figures include.

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

from _common import drop_database, scratch_database, server_dsn

REPO = Path(__file__).resolve().parent.parent
SUPERVISOR = str(Path(sys.executable).with_name("orch8-supervisor"))
SEQUENCE = b'{"name":"load","steps":[{"id":"one","handler":"noop"}]}'
BODY = b'{"sequence":"load"}'


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_node(dsn: str, workers: int, log_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCH8_")}
    environ |= {"DATABASE_URL": dsn, "ORCH8_BIND": f"127.0.0.1:{port}",
                "ORCH8_WORKERS": str(workers), "ORCH8_LOG_LEVEL": "WARNING"}
    log = (log_dir / f"node-{port}.log").open("wb")
    process = subprocess.Popen([SUPERVISOR], env=environ, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1):
                return process, port
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"node on {port} did not become ready; see {log.name}")


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


async def connection(port: int, until: float, tally: Tally) -> None:
    payload = request(port, "/instances", BODY)
    reader = writer = None
    while time.monotonic() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            started = time.monotonic()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            tally.latencies.append(time.monotonic() - started)
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError):
            tally.errors += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def load(ports: list[int], connections: int, seconds: float) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    await asyncio.gather(*(connection(ports[n % len(ports)], until, tally)
                           for n in range(connections)))
    return tally


def one_run(server: str, layout: list[int], connections: int, seconds: float,
            log_dir: Path) -> dict[str, float]:
    dsn = scratch_database(server)
    nodes = []
    try:
        nodes = [start_node(dsn, workers, log_dir) for workers in layout]
        port = nodes[0][1]
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/sequences", SEQUENCE,
            {"Content-Type": "application/json"}), timeout=10).close()
        tally = asyncio.run(load([port for _, port in nodes], connections, seconds))
    finally:
        for process, _ in nodes:
            stop_node(process)
        drop_database(server, dsn)
    ok = tally.statuses.get(201, 0)
    latencies = sorted(tally.latencies) or [0.0]
    return {"created_per_s": ok / seconds, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "refused_503": tally.statuses.get(503, 0), "other": sum(
                count for status, count in tally.statuses.items() if status not in (201, 503)),
            "transport_errors": tally.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    server = server_dsn()
    systems = {"one API process": [args.workers],
               "two API processes": [max(1, args.workers // 2)] * 2}
    log_dir = Path(tempfile.mkdtemp(prefix="orch8-http-load-"))
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for run in range(args.runs):
        for connections in args.connections:
            for name, layout in systems.items():  # interleaved: A B A B
                figures = one_run(server, layout, connections, args.seconds, log_dir)
                results.setdefault((name, connections), []).append(figures)
                print(f"run {run + 1} {name:18} c={connections:<5} {json.dumps(figures)}",
                      flush=True)
    print("\nmedian (min-max) over runs")
    for (name, connections), runs in results.items():
        shown = []
        for key in runs[0]:
            values = [figures[key] for figures in runs]
            shown.append(f"{key} {statistics.median(values):.0f} "
                         f"({min(values):.0f}-{max(values):.0f})")
        print(f"{name:18} c={connections:<5} " + ", ".join(shown))


if __name__ == "__main__":
    main()
