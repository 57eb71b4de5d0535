"""The supervisor's signals: handlers only record, the main loop acts.

    Signal          First time                      During a stop
    SIGTERM         drain (graceful stop)           stop now
    SIGINT, SIGQUIT stop now                        kill the workers (SIGKILL)
    SIGHUP          ignored (a closed terminal must not stop a node)

"Drain": stop claiming, finish every in-flight step, release the rest, deregister, exit 0.
"Stop now": workers cancel what runs and release its claims (fenced), then exit.

Workers ignore SIGINT (a Ctrl-C reaches the whole process group; the supervisor decides)
and treat SIGTERM as their own drain, so a service manager that signals every process
of the group still gets a graceful stop.
"""

from __future__ import annotations

import asyncio
import signal
from collections import deque

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class SignalQueue:
    """Signals received and not yet acted on, in order, plus a wake-up for the loop."""

    def __init__(self, wake: asyncio.Event) -> None:
        self._pending: deque[signal.Signals] = deque()
        self._wake = wake

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route the handled signals here; ignore SIGHUP."""
        for number in HANDLED:
            loop.add_signal_handler(number, self.record, number)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        for number in HANDLED:
            loop.remove_signal_handler(number)

    def record(self, number: signal.Signals) -> None:
        # Only record: no logging, no I/O. The main loop acts on it.
        self._pending.append(number)
        self._wake.set()

    def take(self) -> list[signal.Signals]:
        """Every signal recorded since the last call, oldest first."""
        taken = list(self._pending)
        self._pending.clear()
        return taken
