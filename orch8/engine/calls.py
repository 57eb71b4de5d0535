"""Calling one handler: its timeout, its exceptions as data, and how it is started.

A coroutine handler is started eagerly, on the caller's task: most (`noop`, `log`, a
handler that only computes) return without ever awaiting, and then cost no Task at all.
Only one that really suspends gets a Task of its own for the rest of its run. Plain
functions may block, so they always run in the handler thread pool.
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from contextvars import Context, copy_context
from time import perf_counter
from typing import Any, NamedTuple

import orjson

from orch8.engine.stats import WorkerStats
from orch8.handlers.context import StepContext
from orch8.handlers.registry import Handler, HandlerError
from orch8.model import Step

MAX_ERROR_CHARS = 4000


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
                 unknown: Callable[[str], str] = lambda name: f"unknown handler {name!r}"
                 ) -> None:
        self._stats = stats
        self._threads = threads
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
        try:
            coroutine = handler.function(context, step.params)
            suspended_on = variables.run(coroutine.send, None)
        except StopIteration as returned:
            outcome = _output(returned.value)
        except Exception as error:
            outcome = _failure(step, error)
        else:
            return self._finish(step, _resume(coroutine, suspended_on, variables), started)
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
        function = handler.function if on_start is None else _announcing(
            handler.function, handler.is_async, on_start)
        started = perf_counter()
        try:
            if handler.is_async:
                pending: Awaitable[Any] = function(context, step.params)
            else:
                call = functools.partial(function, context, step.params)
                pending = asyncio.get_running_loop().run_in_executor(self._threads, call)
        except Exception as error:  # an async handler called with the wrong arguments
            self._observe(started)
            return _failure(step, error)
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


@types.coroutine
def _resume(coroutine: Coroutine[Any, Any, Any], suspended_on: Any,
            variables: Context) -> Generator[Any, Any, Any]:
    """Drive, from a new Task, a coroutine already started elsewhere (in `variables`).

    It first hands the Task what the coroutine suspended on (a future the Task then
    waits for), then relays every resumption and every exception (a cancel) to it.
    """
    while True:
        try:
            sent = yield suspended_on
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as error:
            try:
                suspended_on = variables.run(coroutine.throw, error)
            except StopIteration as returned:
                return returned.value
        else:
            try:
                suspended_on = variables.run(coroutine.send, sent)
            except StopIteration as returned:
                return returned.value


def _announcing(function: Any, is_async: bool, on_start: Callable[[], None]) -> Any:
    """`function`, calling `on_start` on the event loop as it starts (from any thread)."""
    if is_async:
        async def announced_async(*args: Any) -> Any:
            on_start()
            return await function(*args)

        return announced_async
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
