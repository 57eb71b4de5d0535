"""systemd's notify protocol (`Type=notify`, `WatchdogSec=`), when the unit asks for it.

systemd passes a datagram socket in `NOTIFY_SOCKET`. The node says `READY=1` once every
worker is up and `STOPPING=1` when a drain or stop begins (the arbiter sends those), and
`Notifier`, ticked by the arbiter's main loop, adds:

- `STATUS=` lines for `systemctl status`: the state, workers up, steps in flight and
  instances completed per second, at most every `STATUS_INTERVAL_S` (at once when the
  state or the health changes);
- `WATCHDOG=1` every half `WATCHDOG_USEC`, while, and only while, the node is healthy:
  the main loop is turning (the pings come from it), the heartbeat has succeeded within
  the stale threshold (past it the cluster has declared the node dead anyway), and no
  live worker has been silent for twice the worker timeout (the arbiter kills a worker
  silent for one; one still silent after two means that remedy itself is stuck).
  Withheld pings make systemd restart the node after `WatchdogSec`. (systemd watches only
  while the unit is running; after `STOPPING=1` its stop timeout applies instead.)

Without `NOTIFY_SOCKET` (any other way of running the node) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from orch8.config import Settings

log = logging.getLogger("orch8.supervisor")

STATUS_INTERVAL_S = 2.0


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; return whether it was sent."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract-namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as error:
        log.warning("could not notify systemd (%s)", error)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """The watchdog period in seconds that systemd asks of this process, if any."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None  # no watchdog, or one meant for another process
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds if seconds > 0 else None


class Slot(Protocol):
    """What the notifier reads of a worker slot."""

    number: int
    last_heard_at: float

    @property
    def alive(self) -> bool: ...


class Beating(Protocol):
    """What the notifier reads of the heartbeat."""

    last_beat_at: float


class Notifier:
    """STATUS lines and watchdog pings; `tick` is called by the supervisor's main loop."""

    def __init__(self, settings: Settings, slots: Sequence[Slot], heartbeat: Beating,
                 environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._environ = os.environ if environ is None else environ
        self._enabled = bool(self._environ.get("NOTIFY_SOCKET"))
        self._watchdog_s = watchdog_interval(self._environ) if self._enabled else None
        self._settings, self._slots, self._heartbeat = settings, slots, heartbeat
        self._clock = clock
        self._next_ping = self._next_status = 0.0
        self._last_shown: tuple[str, str | None] | None = None
        self._completed: tuple[float, int] | None = None

    def tick(self, state: str, summary: Mapping[str, Any]) -> None:
        """Ping the watchdog if due and healthy; send a STATUS line if due or changed."""
        if not self._enabled:
            return
        now = self._clock()
        problem = self.problem(now)
        if self._watchdog_s is not None and problem is None and now >= self._next_ping:
            notify("WATCHDOG=1", self._environ)
            self._next_ping = now + self._watchdog_s / 2
        if now >= self._next_status or (state, problem) != self._last_shown:
            notify("STATUS=" + self._status(now, state, summary, problem), self._environ)
            self._last_shown, self._next_status = (state, problem), now + STATUS_INTERVAL_S

    def problem(self, now: float) -> str | None:
        """Why the node is not healthy enough to ping the watchdog, or None."""
        silent = now - self._heartbeat.last_beat_at
        if silent > self._settings.stale_threshold_s:
            return f"no successful heartbeat for {silent:.0f}s"
        limit = 2 * self._settings.worker_timeout_s
        for slot in self._slots:
            if slot.alive and now - slot.last_heard_at > limit:
                return f"worker {slot.number} silent for {now - slot.last_heard_at:.0f}s"
        return None

    def _status(self, now: float, state: str, summary: Mapping[str, Any],
                problem: str | None) -> str:
        up = sum(1 for slot in self._slots if slot.alive)
        text = (f"{state}: {up}/{len(self._slots)} workers up, "
                f"{summary.get('in_flight', 0)} in flight, "
                f"{self._completed_per_s(now, int(summary.get('completed', 0))):.1f} "
                "completed/s")
        return text + (f"; watchdog withheld: {problem}" if problem else "")

    def _completed_per_s(self, now: float, completed: int) -> float:
        previous, self._completed = self._completed, (now, completed)
        if previous is None or now <= previous[0]:
            return 0.0
        # Totals restart from 0 with a new worker process: count no negative progress.
        return max(0, completed - previous[1]) / (now - previous[0])
