"""Calling one handler: its timeout, its exceptions as data, and how it is started.

A coroutine handler is started eagerly, on the caller's task: most (`noop`, `log`, a
handler that only computes) return without ever awaiting, and then cost no Task at all.
Only one that really suspends gets a Task of its own for the rest of its run. Plain
functions may block, so they always run in the handler thread pool.

Each call is marked in the worker's `Tracker` (the supervisor's table of running steps)
while its handler runs: a call on the event loop in the tracker's lane, one that suspends
or runs in a thread in a row of its own. An exception that ends the process with it
(`SystemExit`, `KeyboardInterrupt`) leaves the mark in place: that step's execution ended
with the process.
"""

from __future__ import annotations

import asyncio
import functools
import types
import uuid
from collections.abc import Awaitable, Callable, Collection, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from contextvars import Context, copy_context
from time import perf_counter
from typing import Any, NamedTuple, Protocol

import orjson

from orch8.engine.stats import WorkerStats
from orch8.handlers.context import StepContext
from orch8.handlers.registry import Handler, HandlerError
from orch8.model import Step

MAX_ERROR_CHARS = 4000
# Exceptions that take the process down with them: the running step's mark stays.
_ENDS_PROCESS = (SystemExit, KeyboardInterrupt)


class Tracker(Protocol):
    """Where a worker records which steps' handlers are running, for whoever must know
    once it has died (`supervisor.running.RunningTable`)."""

    def enter(self, context: StepContext) -> None:
        """A handler starts on the event loop (one at a time: `leave` or `detach` first)."""

    def leave(self) -> None:
        """The event loop's handler returned or raised."""

    def detach(self, context: StepContext) -> int:
        """The event loop's handler suspended: mark it apart; the mark to `clear`."""

    def mark(self, context: StepContext) -> int:
        """A handler starts in a thread; the mark to `clear`."""

    def clear(self, mark: int) -> None:
        """A handler marked apart ended."""

    def running_instances(self) -> Collection[uuid.UUID]:
        """Instances whose handler still runs (a thread that outlived its task)."""


class Outcome(NamedTuple):
    """What one handler call came to: an output, or an error and whether to retry.
    (A named tuple: one is made per step run, and it is four times cheaper to build than
    a frozen dataclass.)"""

    output_json: str | None = None
    output: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = True


class Caller:
    """Calls handlers for one worker: async ones on its loop, plain ones in its threads."""

    def __init__(self, stats: WorkerStats, threads: ThreadPoolExecutor,
                 unknown: Callable[[str], str] = lambda name: f"unknown handler {name!r}",
                 tracker: Tracker | None = None) -> None:
        self._stats = stats
        self._threads = threads
        self._tracker = tracker
        # How long each finished call took, until `count_quick` counts them.
        self._quick: list[float] = []
        # The error for a handler this process lacks (the registry's, which says how to fix it).
        self._unknown = unknown

    def call_now(self, handler: Handler | None, step: Step,
                 context: StepContext) -> Outcome | Awaitable[Outcome]:
        """Start a coroutine handler here; its outcome if it finished without suspending,
        else an awaitable of the rest of the call (timeout included).

        A call that finished here is counted (`steps_executed`, `step_seconds`) at the next
        `count_quick`, which the caller makes once per batch: counting each one as it
        ends cost 0.6 µs, a third of a `noop` call."""
        if handler is None:
            return Outcome(error=self._unknown(step.handler), retryable=False)
        started = perf_counter()
        # A context of its own, as a Task would give it: a context variable a handler sets
        # must not leak into the next handler of the batch.
        variables = copy_context()
        tracker = self._tracker
        if tracker is not None:
            tracker.enter(context)
        try:
            coroutine = handler.function(context, step.params)
            suspended_on = variables.run(coroutine.send, None)
        except StopIteration as returned:
            outcome = _output(returned.value)
        except Exception as error:
            outcome = _failure(step, error)
        except _ENDS_PROCESS:
            raise
        except BaseException:  # (a handler raising CancelledError, say)
            if tracker is not None:
                tracker.leave()
            raise
        else:
            # It suspended: the rest of its call goes on, marked apart until it ends.
            ended = (_nothing if tracker is None
                     else functools.partial(tracker.clear, tracker.detach(context)))
            resume = _resume(coroutine, suspended_on, variables, ended)
            resume.send(None)  # (see `_resume`)
            return self._finish(step, resume, started)
        if tracker is not None:
            tracker.leave()
        self._quick.append(perf_counter() - started)
        return outcome

    def count_quick(self) -> None:
        """Count the calls that finished in `call_now` since the last time (each other
        call is counted as it ends, through here as well)."""
        quick = self._quick
        if quick:
            self._stats.add("steps_executed", len(quick))
            self._stats.step_seconds.observe_each(quick)
            quick.clear()

    async def call(self, handler: Handler | None, step: Step, context: StepContext,
                   on_start: Callable[[], None] | None = None) -> Outcome:
        """Call the step's handler with its timeout; any exception becomes an `Outcome`.

        `on_start`, if given, runs on the event loop once the handler has really started
        (a rate-limited call stamps its start time with it).
        """
        if handler is None:
            return Outcome(error=self._unknown(step.handler), retryable=False)
        if handler.is_async:
            if on_start is not None:
                on_start()  # (it starts here and now)
            outcome = self.call_now(handler, step, context)
            if isinstance(outcome, Outcome):
                self.count_quick()
                return outcome
            return await outcome
        function = handler.function if on_start is None else _announcing(
            handler.function, on_start)
        started = perf_counter()
        call = (functools.partial(function, context, step.params) if self._tracker is None
                else functools.partial(_marked, self._tracker, function, context, step.params))
        pending = asyncio.get_running_loop().run_in_executor(self._threads, call)
        return await self._finish(step, pending, started)

    async def _finish(self, step: Step, pending: Awaitable[Any], started: float) -> Outcome:
        timeout = step.timeout_ms / 1000 if step.timeout_ms else None
        if timeout is not None:
            # An eagerly started call has already used part of its time.
            timeout = max(0.0, timeout - (perf_counter() - started))
        try:
            result = await asyncio.wait_for(pending, timeout)
        except Exception as error:
            return _failure(step, error)
        finally:
            self._observe(started)
        return _output(result)

    def _observe(self, started: float) -> None:
        self._quick.append(perf_counter() - started)
        self.count_quick()


def _failure(step: Step, error: Exception) -> Outcome:
    """A handler's exception, as data."""
    if isinstance(error, TimeoutError):
        return Outcome(error=f"step {step.id} timed out after {step.timeout_ms} ms")
    if isinstance(error, HandlerError):
        return Outcome(error=str(error)[:MAX_ERROR_CHARS], retryable=error.retryable)
    return Outcome(error=f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])


def _nothing() -> None:
    pass


@types.coroutine
def _resume(coroutine: Coroutine[Any, Any, Any], suspended_on: Any, variables: Context,
            ended: Callable[[], None]) -> Generator[Any, Any, Any]:
    """Drive, from a new Task, a coroutine already started elsewhere (in `variables`),
    and call `ended` once it has ended however it ended, unless by an exception that ends
    the process.

    The caller starts it at once, to a first `yield` that hands out nothing: a started
    generator is closed when it is dropped, so a call never awaited (a held claim whose
    write failed drops the calls that suspended in it) is closed where it waited and
    ended too. Then it hands the Task what the coroutine suspended on (a future the Task
    waits for), and relays every resumption and every exception (a cancel) to it.
    """
    try:
        result = yield from _relay(coroutine, suspended_on, variables)
    except _ENDS_PROCESS:
        raise
    except BaseException:
        ended()
        raise
    ended()
    return result


def _relay(coroutine: Coroutine[Any, Any, Any], suspended_on: Any,
           variables: Context) -> Generator[Any, Any, Any]:
    started = False  # (the first resumption is the Task's start: nothing to relay)
    while True:
        try:
            sent = yield suspended_on if started else None
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as error:  # (before the Task's first step too: a cancel)
            started = True
            try:
                suspended_on = variables.run(coroutine.throw, error)
            except StopIteration as returned:
                return returned.value
        else:
            if not started:
                started = True
                continue
            try:
                suspended_on = variables.run(coroutine.send, sent)
            except StopIteration as returned:
                return returned.value


def _marked(tracker: Tracker, function: Any, context: StepContext,
            params: dict[str, Any]) -> Any:
    """Run a plain handler, in its thread, marked for as long as the thread runs it (even
    after its step timed out, or its task was cancelled)."""
    mark = tracker.mark(context)
    try:
        result = function(context, params)
    except Exception:
        tracker.clear(mark)
        raise
    tracker.clear(mark)
    return result


def _announcing(function: Any, on_start: Callable[[], None]) -> Any:
    """`function`, calling `on_start` on the event loop as it starts (from any thread)."""
    loop = asyncio.get_running_loop()

    def announced(*args: Any) -> Any:
        loop.call_soon_threadsafe(on_start)
        return function(*args)

    return announced


def _output(result: Any) -> Outcome:
    """Handlers return a dict (None counts as {}); anything else is the handler's bug."""
    # (`tuple.__new__`: the named tuple's constructor without its Python wrapper, see
    # `orch8.store.claims.Claimed`.)
    if result is None:
        return tuple.__new__(Outcome, ("{}", {}, None, True))
    if type(result) is dict and not result:
        # (No encoder call for the most common output.)
        return tuple.__new__(Outcome, ("{}", result, None, True))
    if not isinstance(result, dict):
        return Outcome(error=f"handler returned {type(result).__name__}, not a dict",
                       retryable=False)
    try:
        encoded = orjson.dumps(result).decode()
    except TypeError as error:
        return Outcome(error=f"handler output is not JSON-serialisable: {error}",
                       retryable=False)
    return tuple.__new__(Outcome, (encoded, result, None, True))
