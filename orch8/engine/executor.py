"""Runs claimed instances: their steps in order until each completes, fails, waits or retries.

A claimed batch runs as a batch, in rounds. Each round starts the current step of every
instance still in hand, records all the outputs that came straight back in one fenced
statement, and goes on with the instances that have steps left. An instance whose step
really waits (a coroutine handler that suspends, a plain function in a thread, a
rate-limited handler) leaves the rounds and goes on alone in a Task of its own, so a slow
step never holds up the rest of its batch. Rare outcomes (a failure, a delay) are written
one by one.

Handlers run outside any transaction. Each outcome is written under the claim's epoch;
a write that does not apply means the claim was lost, and the run stops there quietly.
The one exception is the held claim (`run_locked`): a first attempt at a step that
returns at once runs while its row is locked, and its outcome is written in the same
transaction, so such an instance is written once, never `running`.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from orch8.engine.backoff import backoff_ms
from orch8.engine.calls import Caller, Outcome, Tracker
from orch8.engine.committer import StepCommitter
from orch8.engine.limits import LimitWatch
from orch8.engine.stats import WorkerStats
from orch8.handlers.context import StepContext
from orch8.handlers.registry import Handler, Registry
from orch8.model import Step
from orch8.store import claims, rate_limits, wire
from orch8.store.claims import Claimed, Output, Owner, Settled, StepDone
from orch8.store.sequences import Sequence, get_sequence

log = logging.getLogger("orch8.engine.executor")

T = TypeVar("T")
# A claimed instance's definition, (sequence_name, sequence_version), read in C.
_DEFINITION = operator.attrgetter("sequence_name", "sequence_version")
WRITE_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)
# The most common output, `{}`, written as one shared fragment (immutable) rather than a
# new one per step: 40 against 130 ns.
EMPTY_OUTPUT = orjson.Fragment("{}")


@dataclass(slots=True)
class Run:
    """Where one claimed instance is: its next step, and what earlier steps returned."""

    claimed: Claimed
    sequence: Sequence
    outputs: dict[str, Any]
    index: int
    attempt: int
    delay_done: bool
    ran_a_step: bool = False
    # A held run's call already under way (or its failure) for `_run_alone` to take over.
    pending: Awaitable[Outcome] | None = None

    @property
    def finished(self) -> bool:
        return self.index >= len(self.sequence.steps)

    @property
    def step(self) -> Step:
        return self.sequence.steps[self.index]

    def context(self) -> StepContext:
        return StepContext(self.claimed.id, self.sequence.name, self.step.id, self.attempt + 1,
                           self.claimed.input, dict(self.outputs))

    def done(self, outcome: Outcome) -> StepDone:
        """The fenced record of this step's success."""
        return StepDone(self.claimed.id, self.claimed.epoch, self.step.id, self.attempt + 1,
                        outcome.output_json or "{}", self.index + 1,
                        self.index + 1 == len(self.sequence.steps))

    def advance(self, output: dict[str, Any] | None) -> None:
        self.outputs[self.step.id] = output
        self.index, self.attempt, self.delay_done, self.ran_a_step = self.index + 1, 0, False, True


@dataclass(frozen=True)
class Held:
    """What a held claim did: how many it asked for, the unkeyed instances it locked and
    ran, how many keyed ones it left for the keyed claim, and those of its instances that
    go on (claimed)."""

    limit: int
    locked: list[Claimed]
    keyed: int
    going_on: list[Run]

    @property
    def full(self) -> bool:
        """It found as many due instances as it asked for: a backlog, most likely."""
        return len(self.locked) + self.keyed == self.limit


class HeldConflict(Exception):
    """A held claim recorded nothing because an output it assumed absent was there; the
    next one writes with a conflict check (`Executor.run_locked`)."""


async def _ready(outcome: Outcome) -> Outcome:
    return outcome


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
        tracker: Tracker | None = None,
    ) -> None:
        self._pool = pool
        self._committer = committer
        self._registry = registry
        self._stats = stats
        self._caller = Caller(stats, threads, registry.unknown, tracker)
        self._is_draining = is_draining
        self._limits = limits
        # Definitions are immutable per (name, version), so caching them forever is safe.
        self._sequences: dict[tuple[str, int], Sequence] = {}
        # Whether held claims write their outputs with a conflict check (`settle_locked`):
        # from the first one that found an output already recorded, for good.
        self._settle_checked = False

    async def run(self, claimed: Claimed) -> None:
        """Run one instance's steps until it leaves this worker's hands."""
        await self.run_batch([claimed], lambda count: None)

    async def run_batch(self, batch: list[Claimed], left: Callable[[int], None]) -> None:
        """Run a claimed batch until every instance in it has left this worker's hands.

        `left(n)` is told each time n of them have (completed, failed, waiting, released
        or lost); a cancel stops them all where they are, for the caller to release.
        """
        await self._run(await self._prepare(batch), left)

    async def _run(self, runs: list[Run], left: Callable[[int], None]) -> None:
        """Rounds for the runs, each call already under way going on alone."""
        alone, in_rounds = [], []
        for run in runs:
            if run.pending is None:
                in_rounds.append(run)
            else:
                pending, run.pending = run.pending, None
                alone.append(asyncio.create_task(self._run_alone(run, pending, left)))
        runs = in_rounds
        try:
            while runs:
                runs = await self._round(runs, alone, left)
            if alone:
                await asyncio.gather(*alone)
        finally:
            for task in alone:
                task.cancel()
            if alone:
                await asyncio.gather(*alone, return_exceptions=True)

    async def run_locked(self, conn: psycopg.AsyncConnection[Any], owner: Owner, limit: int,
                         more: Callable[[Held], int], taken: Callable[[Held], None]) -> Held:
        """Held claims (`claims.LOCK_DUE`) on `conn`, one after another while `more` asks
        for another. Each locks up to its limit of due instances, runs each one's steps
        here for as long as they return at once, and writes where each got to, in one
        transaction. The instances that must wait come out of it claimed, handed to
        `taken` (for `resume`) once its commit is confirmed; if it fails, none of them was
        claimed. Return the last one.

        `more(held)` is asked before `held` is written: its answer, the next claim's limit
        (0 for none), is sent with the write and the COMMIT, so that while a backlog lasts
        a batch costs one round trip, not two.
        """
        held: Held | None = None  # the last claim written, until its commit is confirmed
        commit: wire.Sent | None = None
        try:
            async with wire.Pipeline(conn) as pipeline:
                lock = claims.lock_due(pipeline, owner, limit)
                await pipeline.sync()
                while True:
                    locked, keyed = claims.locked(pipeline, lock)
                    settled, outputs, going_on = self._run_held(
                        locked, *await self._look_up(locked))
                    held = Held(limit, locked, keyed, going_on)
                    limit = more(held)
                    commit = claims.settle_locked(pipeline, owner, settled, outputs,
                                                  self._settle_checked, chain=bool(limit))
                    if not limit:
                        break  # leaving the pipeline syncs it: the commit's reply comes back
                    lock = claims.lock_due(pipeline, owner, limit, begun=True)
                    await pipeline.sync()  # the write, its commit, the next lock: one trip
                    self._hand_over(held, taken)
                    held, commit = None, None
        except BaseException as error:
            if held is not None:
                if commit is not None and commit.ok:  # (its reply came back: committed)
                    self._hand_over(held, taken)  # what failed came after its commit
                else:
                    for run in held.going_on:
                        if isinstance(run.pending, Coroutine):
                            run.pending.close()  # its handler stops where it suspended
            if isinstance(error, psycopg.errors.UniqueViolation) and not self._settle_checked:
                # An output the held run's write assumed absent was there (see
                # `claims.SETTLE_LOCKED`). Nothing was written; the next claim takes the
                # same instances and writes with the check, so they are not stuck.
                log.warning("a held claim found a step output already recorded (%s); "
                            "recording outputs with a conflict check from now on", error)
                self._settle_checked = True
                raise HeldConflict(str(error)) from error
            raise
        assert held is not None
        self._hand_over(held, taken)
        return held

    def _hand_over(self, held: Held, taken: Callable[[Held], None]) -> None:
        """A held claim committed: its instances that go on are claimed, under the next
        epoch (and their `ctid`, which held only within that transaction, is dropped)."""
        for run in held.going_on:
            run.claimed = run.claimed._replace(epoch=run.claimed.epoch + 1, ctid=None)
        self._stats.add("completed", len(held.locked) - len(held.going_on))
        taken(held)

    def _run_held(self, locked: list[Claimed], sequences: dict[tuple[str, int], Sequence],
                  earlier_outputs: dict[Any, dict[str, Any]]
                  ) -> tuple[list[Settled], list[Output], list[Run]]:
        """Run locked instances' steps while each returns at once, one instance after
        another; return where each stopped, the outputs to record, and the runs that go on
        under a claim (the only ones that need a `Run`).

        A first attempt only: a handler that kills its process here leaves its row as it
        was locked, so the supervisor charges that row an attempt (`claims.LOCK_HELD`),
        and the next attempt runs under a claim. (The row is free the moment the process
        dies, so another worker may run those steps once more before the charge lands:
        at least once, as always.)
        """
        settled: list[Settled] = []
        outputs: list[Output] = []
        going_on: list[Run] = []
        call_now = self._caller.call_now
        fragment = orjson.Fragment
        # Each step's handler, if a first attempt at it starts here: asked once per step
        # the batch reaches (most batches reach one), not once per instance.
        here: dict[int, tuple[Handler | None] | None] = {}
        for claimed in locked:
            # One unpacking, not a named tuple's attribute look-up per use.
            id_, epoch, name, version, input_, index, attempt, delay_done, _, _, _, ctid = claimed
            sequence = sequences[name, version]
            steps = sequence.steps
            # (Ours to change: loaded for this run. A UUID's hash is a Python call: none
            # when no instance of the batch had earlier steps.)
            earlier = earlier_outputs.get(id_) if earlier_outputs else None
            ran_a_step = False
            while True:
                if index >= len(steps):
                    settled.append((id_, epoch, index, True, ctid))
                    break
                step = steps[index]
                outcome: Outcome | Awaitable[Outcome] | None = None
                if not attempt and (delay_done or not step.delay_ms):
                    key = id(step)  # (the sequence, cached, keeps its steps alive)
                    if key not in here:
                        handler = self._registry.get(step.handler)
                        here[key] = (handler,) if self._starts_here(step, handler) else None
                    starts = here[key]
                    if starts is not None:
                        # (`tuple.__new__`: see `Claimed`.)
                        outcome = call_now(starts[0], step, tuple.__new__(StepContext, (
                            id_, name, step.id, 1, input_, dict(earlier) if earlier else {})))
                if isinstance(outcome, Outcome) and outcome.error is None:
                    index += 1
                    last = index == len(steps)
                    output = outcome.output_json
                    outputs.append((id_, step.id, 1, fragment(output)
                                    if output and output != "{}" else EMPTY_OUTPUT))
                    if last:  # (most runs)
                        settled.append((id_, epoch, index, True, ctid))
                        break
                    if earlier is None:
                        earlier = {}
                    earlier[step.id] = outcome.output
                    attempt, delay_done, ran_a_step = 0, False, True
                    continue
                # It waits, or it failed (written under the claim, as an attempt).
                going_on.append(Run(
                    claimed, sequence, {} if earlier is None else earlier, index, attempt,
                    delay_done, ran_a_step,
                    _ready(outcome) if isinstance(outcome, Outcome) else outcome))
                settled.append((id_, epoch, index, False, ctid))
                break
        self._caller.count_quick()
        return settled, outputs, going_on

    async def resume(self, runs: list[Run], left: Callable[[int], None]) -> None:
        """Run what a held claim claimed from where each stopped, as `run_batch` runs a
        claimed batch."""
        await self._run(runs, left)

    async def _prepare(self, batch: list[Claimed]) -> list[Run]:
        sequences, outputs = await self._look_up(batch)
        return [Run(claimed, sequences[claimed.sequence_name, claimed.sequence_version],
                    outputs.get(claimed.id, {}), claimed.step_index, claimed.attempt,
                    claimed.delay_done)
                for claimed in batch]

    async def _look_up(self, batch: list[Claimed]
                       ) -> tuple[dict[tuple[str, int], Sequence], dict[Any, dict[str, Any]]]:
        """The definitions a batch runs, and the outputs of its instances' earlier steps."""
        resumed = [claimed.id for claimed in batch if claimed.step_index > 0]
        outputs = await self._with_connection(claims.load_outputs, resumed) if resumed else {}
        # One look-up per definition the batch uses (almost always one), not per instance.
        wanted = set(map(_DEFINITION, batch))
        return {key: await self._sequence(*key) for key in wanted}, outputs

    async def _round(self, runs: list[Run], alone: list[asyncio.Task[None]],
                     left: Callable[[int], None]) -> list[Run]:
        """Start every run's current step; record what came straight back; return the
        runs that go on to another round."""
        waiting, releasing, starting = self._sort(runs)
        returned: list[tuple[Run, Outcome]] = []
        handed_off = 0
        for run in starting:
            step = run.step
            handler = self._registry.get(step.handler)
            if not self._starts_here(step, handler):
                pending: Awaitable[Outcome] | None = None
            else:
                outcome = self._caller.call_now(handler, step, run.context())
                if isinstance(outcome, Outcome):
                    returned.append((run, outcome))
                    continue
                pending = outcome  # it suspended: the rest of its call goes on alone
            alone.append(asyncio.create_task(self._run_alone(run, pending, left)))
            handed_off += 1
        self._caller.count_quick()
        going_on = await self._record(returned)
        for run in waiting:
            await self._fenced("delayed", claims.wait, run.claimed, run.step.delay_ms)
        if releasing:
            await self._release(releasing)
        left(len(runs) - len(going_on) - handed_off)
        return going_on

    def _sort(self, runs: list[Run]) -> tuple[list[Run], list[Run], list[Run]]:
        """Split runs into those that wait out a delay, those a drain gives back after the
        step they ran, and those whose step starts now."""
        draining = self._is_draining()
        waiting, releasing, starting = [], [], []
        for run in runs:
            if run.finished:
                self._stats.add("completed")
            elif run.step.delay_ms and not run.delay_done:
                waiting.append(run)
            elif run.ran_a_step and draining:
                releasing.append(run)
            else:
                starting.append(run)
        return waiting, releasing, starting

    async def _record(self, returned: list[tuple[Run, Outcome]]) -> list[Run]:
        """Write the round's outcomes: its successes in one fenced statement, failures one
        by one. Return the runs that have steps left."""
        succeeded = []
        for run, outcome in returned:
            if outcome.error is None:
                succeeded.append((run, outcome))
            else:
                await self._record_failure(run.claimed, run.step, run.attempt + 1, outcome)
        if not succeeded:
            return []
        refused = await self._finish_steps([run.done(outcome) for run, outcome in succeeded])
        going_on, completed = [], 0
        for run, outcome in succeeded:
            if refused and run.claimed.id in refused:
                continue  # (counted and logged by the committer)
            run.advance(outcome.output)
            if run.finished:
                completed += 1
            else:
                going_on.append(run)
        self._stats.add("completed", completed)
        return going_on

    async def _run_alone(self, run: Run, pending: Awaitable[Outcome] | None,
                         left: Callable[[int], None]) -> None:
        """Go on with one instance by itself, from `pending` (a call already started) or
        from its current step, until it leaves this worker's hands."""
        while not run.finished:
            step = run.step
            if pending is not None:
                outcome, pending = await pending, None
            elif step.delay_ms and not run.delay_done:
                await self._fenced("delayed", claims.wait, run.claimed, step.delay_ms)
                break
            elif run.ran_a_step and self._is_draining():
                # Draining: the step in flight has finished; the rest runs on another node.
                await self._release([run])
                break
            else:
                admitted, on_start = await self._admit(run.claimed, step)
                if not admitted:
                    break
                handler = self._registry.get(step.handler)
                outcome = await self._caller.call(handler, step, run.context(), on_start)
            if outcome.error is not None:
                await self._record_failure(run.claimed, step, run.attempt + 1, outcome)
                break
            if await self._finish_steps([run.done(outcome)]):
                break  # its claim was lost (counted and logged by the committer)
            run.advance(outcome.output)
        else:
            self._stats.add("completed")
        left(1)

    def _starts_here(self, step: Step, handler: Handler | None) -> bool:
        """Whether the step's call starts on this task (`Caller.call_now`): a coroutine
        handler with no rate limit, or none at all (its failure comes back at once). A
        plain function needs a thread, a rate limit a slot."""
        return (handler is None or handler.is_async) and not self._limited(step)

    def _limited(self, step: Step) -> bool:
        return self._limits is not None and self._limits.applies(step.handler)

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

    async def _finish_steps(self, done: list[StepDone]) -> set[Any]:
        """Record step successes (group commit); return the ids whose fence refused them.

        A write whose reply was lost (the database went away mid-statement) may still have
        committed. Before it is sent again, and once more if the fence then refuses some,
        the steps already recorded under their claims are looked up: an outcome is never
        applied twice, nor reported lost when it landed.
        """
        tries = 0

        async def attempt() -> set[Any]:
            nonlocal tries
            tries += 1
            pending = done
            if tries > 1:
                recorded = await self._recorded(done)
                pending = [d for d in done if d.id not in recorded]
                if not pending:
                    return set()
            return await self._committer.finish_many(pending)

        refused = await self._retrying(attempt)
        if tries > 1 and refused:
            refused = refused - await self._recorded([d for d in done if d.id in refused])
        return refused

    async def _release(self, runs: list[Run]) -> None:
        """Give back instances a drain stopped between steps (fenced, one statement)."""
        released = await self._with_connection(
            claims.release_unstarted, [run.claimed for run in runs])
        self._stats.add("released", released)
        if released < len(runs):
            self._stats.add("fenced_rejected", len(runs) - released)
            log.warning("%d instances: claim lost; release dropped", len(runs) - released)

    async def _recorded(self, done: list[StepDone]) -> set[Any]:
        """The ids of `done` whose step an earlier write already recorded."""
        async with self._pool.connection() as conn:
            return {d.id for d in done if await claims.step_recorded(conn, d)}

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
