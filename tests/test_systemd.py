"""systemd's notify protocol, read from a real AF_UNIX datagram socket standing in for
systemd (`NOTIFY_SOCKET`): READY, STATUS, WATCHDOG and STOPPING from a real node, the
watchdog withheld while its heartbeat is wedged, and the Notifier's rules on their own."""

from __future__ import annotations

import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from supervisor_process import Cluster

from orch8 import Client
from orch8.config import Settings
from supervisor.systemd import Notifier, watchdog_interval

STATUS = re.compile(r"^STATUS=(\w+): (\d+)/(\d+) workers up, (\d+) in flight, "
                    r"([\d.]+) completed/s(; watchdog withheld: .+)?$")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        yield sock


@pytest.fixture
def cluster(dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(dsn, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def receive_until(sock: socket.socket, wanted: Callable[[str], bool], timeout: float,
                  what: str) -> list[str]:
    """Every line received until one is `wanted` (the last one returned)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            datagram = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s; got {lines[-5:]}") from None
        lines.extend(datagram.splitlines())
        if any(wanted(line) for line in datagram.splitlines()):
            return lines


def receive_for(sock: socket.socket, seconds: float) -> list[str]:
    """Every line received during `seconds`."""
    deadline = time.monotonic() + seconds
    lines: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            lines.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            break
    return lines


def test_node_reports_status_and_pings_only_while_healthy(cluster: Cluster, dsn: str,
                                                          systemd: socket.socket) -> None:
    node = cluster.start("node-a", wait_ready=False, NOTIFY_SOCKET=systemd.getsockname(),
                         WATCHDOG_USEC="1000000")
    first = receive_until(systemd, lambda line: True, 60, "READY=1")
    assert first[0] == "READY=1", first
    receive_until(systemd, lambda line: line == "WATCHDOG=1", 5, "a watchdog ping")
    idle = receive_until(systemd, STATUS.match, 5, "a STATUS line")[-1]
    assert STATUS.match(idle).groups()[:3] == ("active", "2", "2"), idle  # type: ignore[union-attr]

    with Client(dsn) as client:
        client.create_sequence("quick", [{"id": "only", "handler": "noop"}])
        client.start_many([{"sequence": "quick", "input": {}}] * 2000)
    receive_until(systemd, lambda line: bool((m := STATUS.match(line)) and float(m[5]) > 0),
                  30, "a STATUS line with completions per second")

    # Wedge the heartbeat: its UPDATE waits on our lock on the node's row.
    with psycopg.connect(dsn) as wedge:
        wedge.execute("SELECT 1 FROM cluster_nodes WHERE id = 'node-a' FOR UPDATE")
        withheld = receive_until(systemd, lambda line: "watchdog withheld" in line, 30,
                                 "the watchdog to be withheld")[-1]
        assert "watchdog withheld: no successful heartbeat for " in withheld, withheld
        during = receive_for(systemd, 2.0)  # two watchdog periods: four pings if healthy
        assert "WATCHDOG=1" not in during, during
        wedge.rollback()
    receive_until(systemd, lambda line: line == "WATCHDOG=1", 20, "pings to resume")

    node.signal(signal.SIGTERM)
    receive_until(systemd, lambda line: line == "STOPPING=1", 20, "STOPPING=1")
    assert node.wait_exit(30) == 0, node.log()


# --- the Notifier's rules, on a real socket with a clock of the test's own ---------------


@dataclass
class Slot:
    number: int
    last_heard_at: float
    alive: bool = True


@dataclass
class Beat:
    last_beat_at: float


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def notifier(systemd: socket.socket, slots: list[Slot], beat: Beat, clock: Clock,
             **environ: str) -> Notifier:
    settings = Settings(stale_threshold_s=60, heartbeat_interval_s=10, worker_timeout_s=30,
                        workers=len(slots))
    return Notifier(settings, slots, beat, {"NOTIFY_SOCKET": systemd.getsockname(), **environ},
                    clock)


def sent(systemd: socket.socket) -> list[str]:
    return receive_for(systemd, 0.05)


def test_pings_every_half_period_and_withholds_for_a_silent_worker(
        systemd: socket.socket) -> None:
    clock = Clock()
    slots, beat = [Slot(1, clock.now), Slot(2, clock.now)], Beat(clock.now)
    notes = notifier(systemd, slots, beat, clock, WATCHDOG_USEC="4000000")
    notes.tick("active", {"in_flight": 3, "completed": 100})
    assert sent(systemd) == ["WATCHDOG=1",
                             "STATUS=active: 2/2 workers up, 3 in flight, 0.0 completed/s"]
    clock.now += 1.0
    notes.tick("active", {"in_flight": 3, "completed": 150})
    assert sent(systemd) == [], "neither a ping (every 2 s) nor a status (every 2 s) is due"
    clock.now += 1.0
    slots[0].last_heard_at = slots[1].last_heard_at = clock.now
    notes.tick("active", {"in_flight": 1, "completed": 300})
    assert sent(systemd) == ["WATCHDOG=1",
                             "STATUS=active: 2/2 workers up, 1 in flight, 100.0 completed/s"]
    clock.now += 61.0  # worker 2 silent past twice the worker timeout, beat still fresh
    slots[0].last_heard_at = beat.last_beat_at = clock.now
    notes.tick("active", {"in_flight": 0, "completed": 300})
    assert sent(systemd) == ["STATUS=active: 2/2 workers up, 0 in flight, 0.0 completed/s; "
                             "watchdog withheld: worker 2 silent for 61s"]
    slots[1].alive = False  # killed and reaped: the arbiter's remedy worked
    notes.tick("active", {"in_flight": 0, "completed": 300})
    assert sent(systemd) == ["WATCHDOG=1",
                             "STATUS=active: 1/2 workers up, 0 in flight, 0.0 completed/s"]


def test_a_stale_heartbeat_withholds_pings(systemd: socket.socket) -> None:
    clock = Clock()
    slot, beat = Slot(1, clock.now), Beat(clock.now)
    notes = notifier(systemd, [slot], beat, clock, WATCHDOG_USEC="1000000")
    clock.now += 60.5
    slot.last_heard_at = clock.now
    notes.tick("draining", {})
    assert sent(systemd) == ["STATUS=draining: 1/1 workers up, 0 in flight, 0.0 completed/s; "
                             "watchdog withheld: no successful heartbeat for 60s"]
    beat.last_beat_at = clock.now
    notes.tick("draining", {})
    assert sent(systemd)[0] == "WATCHDOG=1"


def test_watchdog_only_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_nothing_is_sent_without_notify_socket(systemd: socket.socket) -> None:
    clock = Clock()
    Notifier(Settings(), [Slot(1, clock.now)], Beat(clock.now), {"WATCHDOG_USEC": "1000000"},
             clock).tick("active", {})
    assert sent(systemd) == []
