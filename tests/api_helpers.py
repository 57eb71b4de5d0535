"""A running `orch8-supervisor` for API, metrics and command-line tests, reached over HTTP.

Each test module gets its own database and node (starting a node takes a second or two);
tests in a module keep out of each other's way with names of their own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from databases import scratch_database

SUPERVISOR = str(Path(sys.executable).with_name("orch8-supervisor"))
CLI = str(Path(sys.executable).with_name("orch8"))
TERMINAL = ("completed", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any ORCH8_* or DATABASE_URL, plus `extra`."""
    kept = {key: value for key, value in os.environ.items()
            if not key.startswith("ORCH8_") and key != "DATABASE_URL"}
    return kept | extra


def database(server_dsn: str, template_name: str) -> ContextManager[str]:
    """A migrated database of its own (for a module's node), dropped afterwards."""
    return scratch_database(server_dsn, template_name, prefix="orch8_api")


@dataclass
class Node:
    """A supervisor subprocess and how to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    token: str | None
    node_id: str
    log: Path
    environ: dict[str, str] = field(repr=False, default_factory=dict)

    def client(self, token: str | None = None) -> httpx.Client:
        chosen = self.token if token is None else token
        headers = {"Authorization": f"Bearer {chosen}"} if chosen else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    @property
    def dsn(self) -> str:
        return self.environ["DATABASE_URL"]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def node_environ(dsn: str, port: int, node_id: str, **settings: str) -> dict[str, str]:
    defaults = {
        "DATABASE_URL": dsn, "ORCH8_BIND": f"127.0.0.1:{port}", "ORCH8_NODE_ID": node_id,
        "ORCH8_WORKERS": "1", "ORCH8_HEARTBEAT_INTERVAL_SECS": "0.5",
        "ORCH8_STALE_THRESHOLD_SECS": "5", "ORCH8_TICK_INTERVAL_MS": "50",
        "ORCH8_DRAIN_TIMEOUT_SECS": "10",
    }
    return clean_environ(**(defaults | settings))


@contextmanager
def running_node(dsn: str, log_dir: Path, token: str | None = None, host: str = "127.0.0.1",
                 **settings: str) -> Iterator[Node]:
    """Start `orch8-supervisor` on `host`, wait until /health/ready, stop it (TERM, KILL).

    The tests reach it on 127.0.0.1 whatever `host` it binds.
    """
    port = free_port()
    node_id = f"api-{uuid.uuid4().hex[:8]}"
    extra = {"ORCH8_BIND": f"{host}:{port}"} | ({"ORCH8_API_TOKEN": token} if token else {})
    environ = node_environ(dsn, port, node_id, **(settings | extra))
    log = log_dir / f"{node_id}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([SUPERVISOR], env=environ, stdout=sink,
                                   stderr=subprocess.STDOUT, cwd=log_dir)
    node = Node(process, f"http://127.0.0.1:{port}", token, node_id, log, environ)
    try:
        wait_ready(node)
        yield node
    finally:
        stop(process)


def wait_ready(node: Node, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise AssertionError(f"supervisor exited {node.process.returncode}:\n"
                                 f"{node.output()}")
        try:
            if httpx.get(node.url + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"supervisor not ready:\n{node.output()}")


def stop(process: subprocess.Popen[Any], timeout_s: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(client: httpx.Client, instance_id: str, states: tuple[str, ...] = TERMINAL,
             timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll the API until the instance is in one of `states`."""
    deadline = time.monotonic() + timeout_s
    while True:
        instance: dict[str, Any] = client.get(f"/instances/{instance_id}").json()
        if instance["state"] in states:
            return instance
        if time.monotonic() > deadline:
            raise AssertionError(f"instance still {instance['state']}: {instance}")
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (workers are forked by a fork server, one level down)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""  # it has just exited
