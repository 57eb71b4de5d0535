"""The table of running handlers: what a process that died was running, read after its death.

Handlers are called as a worker calls them (`orch8.engine.calls.Caller`, with the table as
its tracker): coroutines on the event loop, in the table's lane, plain functions in a
thread, in rows of their own.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from orch8.engine.calls import Caller, Outcome
from orch8.engine.stats import WorkerStats
from orch8.handlers.context import StepContext
from orch8.handlers.registry import Handler
from orch8.model import Step
from supervisor.running import RunningStep, RunningTable

DIES = uuid.UUID(int=1)
RETURNS = uuid.UUID(int=2)
RAISES = uuid.UUID(int=3)
CANCELLED = uuid.UUID(int=4)
WAITS = uuid.UUID(int=5)


def context(instance_id: uuid.UUID, step_id: str = "s", attempt: int = 1) -> StepContext:
    return StepContext(instance_id, "seq", step_id, attempt, {}, {})


def returns(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    return {}


def raises(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


async def returns_now(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    return {}


async def raises_now(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


async def cancelled_now(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    raise asyncio.CancelledError


async def waits(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(60)
    return {}


async def waits_briefly(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {}


def dies(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    os._exit(1)


async def dies_on_the_loop(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    os._exit(1)


def handler(function: Any) -> Handler:
    return Handler(function.__name__, function, asyncio.iscoroutinefunction(function))


def call(caller: Caller, function: Any, ctx: StepContext) -> Outcome:
    """Call `function` as an executor's round does: started here, awaited if it waits."""

    async def run() -> Outcome:
        started = caller.call_now(handler(function), Step(ctx.step_id, function.__name__), ctx)
        return started if isinstance(started, Outcome) else await started

    if asyncio.iscoroutinefunction(function):
        return asyncio.run(run())
    return asyncio.run(caller.call(handler(function), Step(ctx.step_id, function.__name__),
                                   ctx))


def new_caller(table: RunningTable) -> Caller:
    return Caller(WorkerStats(), ThreadPoolExecutor(1), tracker=table)


def run_then_die(table: RunningTable, last: Any) -> None:
    """In a child process: run handlers that end every way a handler can, on the loop and
    in threads, then `last`, which ends the process."""
    caller = new_caller(table)
    assert call(caller, returns, context(RETURNS)).error is None
    assert call(caller, raises, context(RAISES)).error == "RuntimeError: boom"
    assert call(caller, returns_now, context(RETURNS)).error is None
    assert call(caller, raises_now, context(RAISES)).error == "RuntimeError: boom"
    assert call(caller, waits_briefly, context(WAITS)).error is None

    async def cancel() -> None:
        started = caller.call_now(handler(waits), Step("s", "waits"), context(CANCELLED))
        assert not isinstance(started, Outcome)
        task = asyncio.ensure_future(started)
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(cancel())
    call(caller, last, context(DIES, "boom", 3))


@pytest.mark.parametrize("last", [dies, dies_on_the_loop], ids=["in a thread", "on the loop"])
def test_a_dead_process_leaves_exactly_its_running_step_marked(last: Any) -> None:
    table = RunningTable.create(8)
    try:
        process = multiprocessing.get_context("spawn").Process(target=run_then_die,
                                                               args=(table, last))
        process.start()
        process.join(30)
        assert process.exitcode == 1
        assert table.steps() == [RunningStep(DIES, "boom", 3)]
    finally:
        table.close()


def test_abandoned_steps_are_told_apart_and_rows_are_reused() -> None:
    table = RunningTable.create(2)
    try:
        first = table.mark(context(RETURNS, "a" * 128))
        second = table.mark(context(RAISES))
        assert table.mark(context(DIES)) == -1, "a full table marks nothing"
        table.clear(second)
        assert table.mark(context(DIES, "d", 7)) == second
        table.enter(context(WAITS, "on-the-loop", 2))
        table.abandon()
        assert sorted(table.steps(), key=lambda step: step.instance_id) == [
            RunningStep(DIES, "d", 7, abandoned=True),
            RunningStep(RETURNS, "a" * 128, 1, abandoned=True),
            RunningStep(WAITS, "on-the-loop", 2, abandoned=True)]
        assert table.running_instances() == set()
        table.clear(first)
        assert [step.instance_id for step in table.steps()] == [DIES, WAITS]
    finally:
        table.close()


def test_the_lane_holds_the_step_it_was_last_given() -> None:
    table = RunningTable.create(1)
    try:
        table.enter(context(RETURNS, "first"))
        table.leave()
        assert table.steps() == []
        table.enter(context(RAISES, "a-longer-second-step", 2))
        assert table.steps() == [RunningStep(RAISES, "a-longer-second-step", 2)]
        table.leave()
        table.enter(context(DIES, "3"))
        assert table.steps() == [RunningStep(DIES, "3", 1)]
        row = table.detach(context(DIES, "3"))
        assert row == 0
        assert table.steps() == [RunningStep(DIES, "3", 1)], "moved, never unmarked"
        table.clear(row)
        assert table.steps() == []
    finally:
        table.close()


def test_a_handler_that_raises_cancelled_on_the_loop_leaves_nothing_marked() -> None:
    table = RunningTable.create(2)
    try:
        with pytest.raises(asyncio.CancelledError):
            new_caller(table).call_now(handler(cancelled_now), Step("s", "c"),
                                       context(CANCELLED))
        assert table.steps() == []
    finally:
        table.close()


def test_a_coroutine_closed_where_it_waited_clears_its_row() -> None:
    # A held claim whose write fails drops the calls that suspended in it, never awaited:
    # they did not finish, but they no longer run, and their rows must not stay marked.
    table = RunningTable.create(2)
    closed = []

    async def waits_and_says(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
        try:
            await asyncio.sleep(60)
        finally:
            closed.append(ctx.instance_id)
        return {}

    try:
        async def suspend_then_drop() -> list[RunningStep]:
            started = new_caller(table).call_now(handler(waits_and_says), Step("s", "w"),
                                                 context(CANCELLED))
            assert not isinstance(started, Outcome)
            marked = table.steps()
            started.close()  # type: ignore[attr-defined]
            del started
            return marked

        assert asyncio.run(suspend_then_drop()) == [RunningStep(CANCELLED, "s", 1)]
        assert closed == [CANCELLED], "closed where it waited"
        assert table.steps() == []
    finally:
        table.close()
