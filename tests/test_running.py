"""The table of running handlers: what a process that died was running, read after its death."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import uuid
from typing import Any

import pytest

from orch8.handlers.context import StepContext
from orch8.handlers.registry import Registry
from supervisor.running import RunningStep, RunningTable, tracked

DIES = uuid.UUID(int=1)
RETURNS = uuid.UUID(int=2)
RAISES = uuid.UUID(int=3)
CANCELLED = uuid.UUID(int=4)


def context(instance_id: uuid.UUID, step_id: str = "s", attempt: int = 1) -> StepContext:
    return StepContext(instance_id, "seq", step_id, attempt, {}, {})


def handlers() -> Registry:
    registry = Registry()

    def returns(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    def raises(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    async def waits(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(60)
        return {}

    def dies(ctx: StepContext, params: dict[str, Any]) -> dict[str, Any]:
        os._exit(1)

    for function in (returns, raises, waits, dies):
        registry.register(function.__name__, function)
    return registry


def run_then_die(table: RunningTable) -> None:
    """In a child process: run handlers that end every way a handler can, then one that
    ends the process."""
    registry = tracked(handlers(), table)
    registry.get("returns").function(context(RETURNS), {})  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        registry.get("raises").function(context(RAISES), {})  # type: ignore[union-attr]

    async def cancel() -> None:
        task = asyncio.create_task(
            registry.get("waits").function(context(CANCELLED), {}))  # type: ignore[union-attr]
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(cancel())
    registry.get("dies").function(context(DIES, "boom", 3), {})  # type: ignore[union-attr]


def test_a_dead_process_leaves_exactly_its_running_step_marked() -> None:
    table = RunningTable.create(8)
    try:
        process = multiprocessing.get_context("spawn").Process(target=run_then_die,
                                                               args=(table,))
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
        table.abandon()
        assert sorted(table.steps(), key=lambda step: step.instance_id) == [
            RunningStep(DIES, "d", 7, abandoned=True),
            RunningStep(RETURNS, "a" * 128, 1, abandoned=True)]
        assert table.running_instances() == set()
        table.clear(first)
        assert [step.instance_id for step in table.steps()] == [DIES]
    finally:
        table.close()


def test_a_coroutine_closed_where_it_waited_clears_its_row() -> None:
    # A held claim whose write fails closes the handlers that suspended in it: they did
    # not finish, but they no longer run, and their rows must not stay marked.
    table = RunningTable.create(2)
    try:
        registry = tracked(handlers(), table)

        async def suspend_then_close() -> list[RunningStep]:
            call = registry.get("waits").function(  # type: ignore[union-attr]
                context(CANCELLED), {})
            call.send(None)  # started as the executor starts it; suspends on its sleep
            marked = table.steps()
            call.close()
            return marked

        assert [step.instance_id for step in asyncio.run(suspend_then_close())] == [CANCELLED]
        assert table.steps() == []
    finally:
        table.close()
