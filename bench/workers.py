"""Child processes for the loops that are not orch8 (the raw loop, pgqueuer consumers):
started together, released together, stopped together."""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CONTEXT = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Signals:
    """What a child shares with the bench: it says `ready`, waits for `go`, stops on
    `stop`, adds what it finished to `done`, and puts its finishing time on `finished`."""

    ready: Any
    go: Any
    stop: Any
    done: Any
    finished: Any

    def await_go(self) -> None:
        self.ready.release()
        self.go.wait()

    def count(self, finished: int) -> None:
        with self.done.get_lock():
            self.done.value += finished


@dataclass(frozen=True)
class Crew:
    """The running children and their shared signals."""

    signals: Signals
    processes: list[Any]

    def check(self) -> None:
        """A child that died is an error now, not a timeout later."""
        for process in self.processes:
            if process.exitcode not in (None, 0):
                raise RuntimeError(f"a bench child exited with code {process.exitcode}")

    def wait_count(self, target: int, timeout_s: float) -> bool:
        """Until the children's shared counter reaches `target` (an O(1) read)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.signals.done.value >= target:
                return True
            self.check()
            time.sleep(0.01)
        return False

    def finishing_times(self, timeout_s: float) -> list[float]:
        """One finishing time from every child, or an error if one died or hangs."""
        deadline, times = time.monotonic() + timeout_s, []
        while len(times) < len(self.processes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench children not finished within {timeout_s:.0f} s")
            try:
                times.append(self.signals.finished.get(timeout=0.1))
            except queue.Empty:
                self.check()
        return times


@contextmanager
def children(target: Callable[..., None], count: int, *args: Any) -> Iterator[Crew]:
    """`count` processes running `target(signals, slot, *args)`; yielded once all are ready."""
    signals = Signals(CONTEXT.Semaphore(0), CONTEXT.Event(), CONTEXT.Event(),
                      CONTEXT.Value("q", 0), CONTEXT.Queue())
    crew = Crew(signals, [CONTEXT.Process(target=target, args=(signals, slot, *args),
                                          daemon=True) for slot in range(count)])
    for process in crew.processes:
        process.start()
    try:
        for _ in crew.processes:
            while not signals.ready.acquire(timeout=0.1):
                crew.check()
        yield crew
    finally:
        signals.stop.set()
        signals.go.set()
        for process in crew.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
