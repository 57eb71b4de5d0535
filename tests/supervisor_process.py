"""Start real `orch8-supervisor` processes for tests, and always clean them up.

Each node runs in a session of its own, so the test can signal the whole node (the
supervisor, the forkserver and every worker) as one process group, and teardown can kill
whatever is left by that group's id.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from api_helpers import SUPERVISOR

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

FAST = {
    "ORCH8_WORKERS": "2",
    "ORCH8_HEARTBEAT_INTERVAL_SECS": "1",
    "ORCH8_STALE_THRESHOLD_SECS": "3",
    "ORCH8_TICK_INTERVAL_MS": "50",
    "ORCH8_HANDLERS": "handlers_for_tests",
    "ORCH8_LOG_LEVEL": "INFO",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Node:
    node_id: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url(path), timeout=5)

    def post(self, path: str) -> httpx.Response:
        return httpx.post(self.url(path), timeout=5)

    def ready_status(self) -> int | None:
        try:
            return self.get("/health/ready").status_code
        except httpx.HTTPError:
            return None

    def signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def signal_group(self, number: int) -> None:
        # Once reaped, the node's pid may lead another process's group: never signal it.
        assert self.process.returncode is None, f"{self.node_id} has already exited"
        os.killpg(self.pid, number)  # the node is its own session: pgid == pid

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """Live worker processes of this node, found by their process titles."""
        return worker_pids(self.node_id)


def worker_pids(node_id: str, under: int | None = None) -> list[int]:
    """Worker processes titled for `node_id`; with `under`, only descendants of that pid
    (node ids repeat across tests, and an earlier test's orphaned worker may still be
    exiting under the same title)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if title.startswith("orch8 worker ") and title.endswith(f" {node_id}") and state != "Z":
            if under is None or _descends_from(int(entry.name), under):
                found.append(int(entry.name))
    return sorted(found)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Cluster:
    """Starts nodes on one database; `close()` kills every one of them by group id."""

    dsn: str
    log_dir: Path
    nodes: list[Node] = field(default_factory=list)

    def environment(self, node_id: str, port: int, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH8_")}
        env.update(FAST)
        env.update({"DATABASE_URL": self.dsn, "ORCH8_NODE_ID": node_id,
                    "ORCH8_BIND": f"127.0.0.1:{port}", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO_DIR)])})
        env.update(extra)
        return env

    def start(self, node_id: str, wait_ready: bool = True, args: tuple[str, ...] = (),
              cwd: Path | None = None, **extra: str) -> Node:
        """Start a node (from the repository, or with the installed `orch8-supervisor`
        from `cwd`, as an operator runs it from a directory of theirs)."""
        port = free_port()
        log_path = self.log_dir / f"{node_id}.log"
        command = [SUPERVISOR] if cwd else [sys.executable, "-m", "supervisor.main"]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, *args],
                env=self.environment(node_id, port, extra), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd or REPO_DIR)
        node = Node(node_id, port, process, log_path)
        self.nodes.append(node)
        if wait_ready:
            wait_until(lambda: node.ready_status() == 200 or process.poll() is not None,
                       60, f"{node_id} to be ready")
            assert process.poll() is None, node.log()
        return node

    def close(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                # Not reaped yet, so its pid (and group id) cannot have been reused.
                _kill_group(node.pid)
            else:
                # Reaped: with a small pid_max its pid may already lead someone else's group
                # (a PostgreSQL postmaster calls setsid). Kill only what is left of this node.
                for pid in worker_pids(node.node_id):
                    if _group_of(pid) == node.pid:
                        _kill(pid)
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class ReadinessWatch:
    """Polls /health/ready of some nodes in a thread, keeping every answer:
    (node id, status or None, body, time.time() when asked)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.answers: list[tuple[str, int | None, str, float]] = []
        self._nodes = nodes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReadinessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.02):
                for node in self._nodes:
                    asked = time.time()
                    try:
                        response = client.get(node.url("/health/ready"))
                        self.answers.append((node.node_id, response.status_code,
                                             response.text, asked))
                    except httpx.HTTPError as error:
                        self.answers.append((node.node_id, None, repr(error), asked))
