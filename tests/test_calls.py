"""Calling handlers: eager start of coroutines, exceptions as data, timeouts, context."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from concurrent.futures import ThreadPoolExecutor

from orch8.engine.calls import Caller, Outcome
from orch8.engine.stats import WorkerStats
from orch8.handlers.context import StepContext
from orch8.handlers.registry import Handler, HandlerError
from orch8.model import Step

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")


def context() -> StepContext:
    return StepContext(uuid.uuid4(), "s", "step", 1, {}, {})


async def at_once(ctx, params):
    SEEN.set("set by at_once")
    return {"n": params["n"]}


async def after_a_wait(ctx, params):
    await asyncio.sleep(params.get("s", 0.01))
    return {"waited": True, "seen": SEEN.get()}


async def refuses(ctx, params):
    raise HandlerError("no", retryable=False)


async def reads(ctx, params):
    return {"seen": SEEN.get()}


def run_calls(*calls: tuple[object, Step]) -> list[Outcome | str]:
    """call_now each handler in turn on one task; 'suspended' marks those that waited."""

    async def main() -> list[Outcome | str]:
        stats = WorkerStats()
        caller = Caller(stats, ThreadPoolExecutor(1))
        answers: list[Outcome | str] = []
        for function, step in calls:
            started = caller.call_now(Handler(step.handler, function, True), step, context())
            if isinstance(started, Outcome):
                answers.append(started)
            else:
                answers += ["suspended", await started]
        caller.count_quick()  # (the calls that returned at once: counted once per batch)
        assert stats.counts["steps_executed"] == len(calls)
        assert sum(stats.step_seconds.counts) == len(calls)
        return answers

    return asyncio.run(main())


def test_a_coroutine_that_never_waits_is_done_at_once_and_one_that_waits_is_not():
    answers = run_calls((at_once, Step("a", "at_once", {"n": 1})),
                        (after_a_wait, Step("b", "after_a_wait")))
    assert answers[0] == Outcome(output_json='{"n":1}', output={"n": 1})
    assert answers[1] == "suspended"
    assert answers[2].output == {"waited": True, "seen": "unset"}


def test_exceptions_before_the_first_wait_are_data():
    [answer] = run_calls((refuses, Step("a", "refuses")))
    assert answer == Outcome(error="no", retryable=False)


def test_a_context_variable_set_by_one_handler_is_not_seen_by_the_next():
    answers = run_calls((at_once, Step("a", "at_once", {"n": 1})), (reads, Step("b", "reads")))
    assert answers[1].output == {"seen": "unset"}


def test_an_eagerly_started_call_that_waits_too_long_times_out():
    answers = run_calls((after_a_wait, Step("a", "after_a_wait", {"s": 30}, timeout_ms=50)))
    assert answers == ["suspended", Outcome(error="step a timed out after 50 ms")]
