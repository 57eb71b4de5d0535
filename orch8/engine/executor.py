"""Runs one claimed instance: its steps in order until it completes, fails, waits or retries.

Handlers run outside any transaction. Each outcome is written under the claim's epoch;
a write that does not apply means the claim was lost, and the run stops there quietly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from orch8.engine.backoff import backoff_ms
from orch8.engine.committer import StepCommitter
from orch8.engine.limits import LimitWatch
from orch8.engine.stats import WorkerStats
from orch8.handlers.context import StepContext
from orch8.handlers.registry import HandlerError, Registry
from orch8.model import Step
from orch8.store import claims, rate_limits
from orch8.store.claims import Claimed, StepDone
from orch8.store.sequences import Sequence, get_sequence

log = logging.getLogger("orch8.engine.executor")

T = TypeVar("T")
MAX_ERROR_CHARS = 4000
WRITE_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Outcome:
    """What one handler call came to: an output, or an error and whether to retry."""

    output_json: str | None = None
    output: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = True


class Executor:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        committer: StepCommitter,
        registry: Registry,
        stats: WorkerStats,
        threads: ThreadPoolExecutor,
        is_draining: Callable[[], bool],
        limits: LimitWatch | None = None,
    ) -> None:
        self._pool = pool
        self._committer = committer
        self._registry = registry
        self._stats = stats
        self._threads = threads
        self._is_draining = is_draining
        self._limits = limits
        # Definitions are immutable per (name, version), so caching them forever is safe.
        self._sequences: dict[tuple[str, int], Sequence] = {}

    async def run(self, claimed: Claimed) -> None:
        """Run the instance's steps until it leaves this worker's hands."""
        sequence = await self._sequence(claimed.sequence_name, claimed.sequence_version)
        outputs: dict[str, Any] = {}
        if claimed.step_index > 0:
            outputs = await self._with_connection(claims.load_outputs, claimed.id)
        index, attempt, delay_done = claimed.step_index, claimed.attempt, claimed.delay_done
        ran_a_step = False
        while index < len(sequence.steps):
            step = sequence.steps[index]
            if step.delay_ms and not delay_done:
                await self._fenced("delayed", claims.wait, claimed, step.delay_ms)
                return
            if ran_a_step and self._is_draining():
                # Draining: the step in flight has finished; the rest runs on another node.
                await self._fenced("released", _release_one, claimed)
                return
            admitted, on_start = await self._admit(claimed, step)
            if not admitted:
                return
            context = StepContext(claimed.id, sequence.name, step.id, attempt + 1,
                                  claimed.input, dict(outputs))
            outcome = await self.call(step, context, on_start)
            ran_a_step = True
            if outcome.error is not None:
                await self._record_failure(claimed, step, attempt + 1, outcome)
                return
            last = index + 1 == len(sequence.steps)
            done = StepDone(claimed.id, claimed.epoch, step.id, attempt + 1,
                            outcome.output_json or "{}", index + 1, last)
            if not await self._finish_step(done):
                return
            outputs[step.id] = outcome.output
            index, attempt, delay_done = index + 1, 0, False
        self._stats.add("completed")

    async def call(self, step: Step, context: StepContext,
                   on_start: Callable[[], None] | None = None) -> Outcome:
        """Call the step's handler with its timeout; any exception becomes an `Outcome`.

        `on_start`, if given, runs on the event loop once the handler has really started
        (a rate-limited call stamps its start time with it).
        """
        handler = self._registry.get(step.handler)
        if handler is None:
            return Outcome(error=self._registry.unknown(step.handler), retryable=False)
        function = handler.function if on_start is None else _announcing(
            handler.function, handler.is_async, on_start)
        started = time.perf_counter()
        try:
            if handler.is_async:
                pending: Awaitable[Any] = function(context, step.params)
            else:
                call = functools.partial(function, context, step.params)
                pending = asyncio.get_running_loop().run_in_executor(self._threads, call)
            timeout = step.timeout_ms / 1000 if step.timeout_ms else None
            result = await asyncio.wait_for(pending, timeout)
        except TimeoutError:
            return Outcome(error=f"step {step.id} timed out after {step.timeout_ms} ms")
        except HandlerError as error:
            return Outcome(error=str(error)[:MAX_ERROR_CHARS], retryable=error.retryable)
        except Exception as error:
            return Outcome(error=f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])
        finally:
            self._stats.add("steps_executed")
            self._stats.step_seconds.append(time.perf_counter() - started)
        return _output(result)

    async def _admit(
        self, claimed: Claimed, step: Step
    ) -> tuple[bool, Callable[[], None] | None]:
        """Whether to call the handler now, and what to run once the call has started.

        Only handlers with a rate limit pay a query: one statement that takes a call slot,
        or defers the instance to when one frees (not a failure, not an attempt).
        """
        if self._limits is None or not self._limits.applies(step.handler):
            return True, None
        admission = await self._with_connection(
            rate_limits.admit, claimed.id, claimed.epoch, step.handler)
        if admission.admitted:
            return True, self._limits.stamper(step.handler, admission.slot)
        if admission.held:
            self._stats.add("rate_limited")
        else:
            self._stats.add("fenced_rejected")
            log.warning("instance %s: claim lost before step %s was admitted; dropped",
                        claimed.id, step.id)
        return False, None

    async def _record_failure(
        self, claimed: Claimed, step: Step, attempts_made: int, outcome: Outcome
    ) -> None:
        error = outcome.error or "failed"
        if outcome.retryable and attempts_made < step.retry.max_attempts:
            delay = backoff_ms(step.retry, attempts_made)
            await self._fenced("retried", claims.retry_later, claimed, error, delay)
        else:
            await self._fenced("failed", claims.fail, claimed, error)

    async def _finish_step(self, done: StepDone) -> bool:
        tries = 0

        async def attempt() -> bool:
            nonlocal tries
            tries += 1
            if tries > 1 and await self._recorded(done):
                return True  # the failed write had committed; its reply was lost
            return await self._committer.finish(done)

        applied = await self._retrying(attempt)
        if not applied and tries > 1:  # a write lost in flight may have landed meanwhile
            applied = await self._recorded(done)
        if not applied:  # counted by the committer, which sees even a cancelled caller's
            log.warning("instance %s: claim lost before step %s was recorded; dropped",
                        done.id, done.step_id)
        return applied

    async def _recorded(self, done: StepDone) -> bool:
        async with self._pool.connection() as conn:
            return await claims.step_recorded(conn, done)

    async def _fenced(
        self, counter: str, write: Callable[..., Awaitable[bool]], *args: Any
    ) -> None:
        applied = await self._with_connection(write, *args)
        if applied:
            self._stats.add(counter)
        else:
            self._stats.add("fenced_rejected")
            log.warning("instance %s: claim lost; %s write dropped", args[0].id, counter)

    async def _with_connection(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def attempt() -> T:
            async with self._pool.connection() as conn:
                return await function(conn, *args)

        return await self._retrying(attempt)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Keep an outcome through a short database outage instead of losing it.

        The outcome exists only in this process; if the database stays away past the last
        wait, the error propagates and the claim is released when this worker goes.
        """
        for pause in WRITE_RETRY_S:
            try:
                return await attempt()
            except (OSError, psycopg.OperationalError) as error:
                log.warning("database write failed (%s); retrying in %.1fs", error, pause)
                await asyncio.sleep(pause)
        return await attempt()

    async def _sequence(self, name: str, version: int) -> Sequence:
        key = (name, version)
        if key not in self._sequences:
            self._sequences[key] = await self._with_connection(
                get_sequence(name, version).run_async)
        return self._sequences[key]


async def _release_one(conn: Any, claimed: Claimed) -> bool:
    return await claims.release_unstarted(conn, [claimed]) == 1


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
    if result is None:
        result = {}
    if not isinstance(result, dict):
        return Outcome(error=f"handler returned {type(result).__name__}, not a dict",
                       retryable=False)
    try:
        encoded = orjson.dumps(result).decode()
    except TypeError as error:
        return Outcome(error=f"handler output is not JSON-serialisable: {error}",
                       retryable=False)
    return Outcome(output_json=encoded, output=result)
