"""The `rate_limits` tables: per-handler limits, and the admission of one handler call.

A limit is "at most `max_calls` calls of this handler in any `window_ms`", over the whole
cluster. It is kept as `max_calls` slot rows, each holding the time it was last used. A
call takes the least recently used slot, and only if that use has left the window; it
stamps the slot with the database's `now()`. Each slot therefore serves at most one call
per window, so no window of that length (wherever it starts) holds more than `max_calls`
calls: a sliding window, with no boundary at which twice the limit could pass.

A step that finds no free slot is not failed and does not count as an attempt: it is put
back in the queue (fenced by its claim) until a booked moment when a slot will be free.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from orch8.errors import DefinitionError, NotFound
from orch8.model import parse_name
from orch8.store.query import Query, Row

MAX_CALLS = 100_000
MIN_WINDOW_MS = 10
MAX_WINDOW_MS = 86_400_000  # a day


@dataclass(frozen=True)
class RateLimit:
    """One handler's limit, with how many calls the current window holds."""

    handler: str
    max_calls: int
    window_ms: int
    calls_in_window: int
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "handler": self.handler,
            "max_calls": self.max_calls,
            "window_ms": self.window_ms,
            "calls_in_window": self.calls_in_window,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def validate(handler: Any, max_calls: Any, window_ms: Any) -> tuple[str, int, int]:
    """Check a limit's fields; raise `DefinitionError` naming the first bad one."""
    name = parse_name(handler, "handler")
    if not _is_int(max_calls) or not 1 <= max_calls <= MAX_CALLS:
        raise DefinitionError("max_calls", f"must be an integer from 1 to {MAX_CALLS}")
    if not _is_int(window_ms) or not MIN_WINDOW_MS <= window_ms <= MAX_WINDOW_MS:
        raise DefinitionError(
            "window_ms", f"must be an integer from {MIN_WINDOW_MS} to {MAX_WINDOW_MS}")
    return name, int(max_calls), int(window_ms)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rate_limit(row: Row) -> RateLimit:
    return RateLimit(row["handler"], row["max_calls"], row["window_ms"],
                     row["calls_in_window"], row["created_at"], row["updated_at"])


# Create or replace a limit and give it exactly `max_calls` slots (numbered from 0).
# Lowering a limit first carries the most recent calls onto the slots that remain, so the
# window in progress still counts; `greatest` never moves a slot a concurrent call has
# just stamped back in time. Workers re-read the list of limited handlers every few seconds.
SET = """
WITH rule AS (
    INSERT INTO rate_limits (handler, max_calls, window_ms)
    VALUES (%(handler)s, %(max_calls)s, %(window_ms)s)
    ON CONFLICT (handler) DO UPDATE
        SET max_calls = excluded.max_calls, window_ms = excluded.window_ms,
            next_wake = 'epoch', updated_at = now()
    RETURNING handler, max_calls, window_ms, created_at, updated_at
), grown AS (
    INSERT INTO rate_limit_slots (handler, slot)
    SELECT rule.handler, g FROM rule, generate_series(0, rule.max_calls - 1) AS g
    ON CONFLICT DO NOTHING
), recent AS (
    SELECT last_call, row_number() OVER (ORDER BY last_call DESC) - 1 AS rank
    FROM rate_limit_slots WHERE handler = %(handler)s
), carried AS (
    UPDATE rate_limit_slots s SET last_call = greatest(s.last_call, recent.last_call)
    FROM recent, rule
    WHERE s.handler = rule.handler AND s.slot = recent.rank AND recent.rank < rule.max_calls
      AND (SELECT count(*) FROM recent) > rule.max_calls
), shrunk AS (
    DELETE FROM rate_limit_slots s USING rule
    WHERE s.handler = rule.handler AND s.slot >= rule.max_calls
)
SELECT handler, max_calls, window_ms, 0 AS calls_in_window, created_at, updated_at
FROM rule
"""


def set_rate_limit(handler: str, max_calls: int, window_ms: int) -> Query[RateLimit]:
    """Limit `handler` to `max_calls` calls in any `window_ms` (replacing any old limit)."""
    name, calls, window = validate(handler, max_calls, window_ms)
    params = {"handler": name, "max_calls": calls, "window_ms": window}
    return Query(SET, params, lambda rows: _rate_limit(rows[0]))


LIST = """
SELECT r.handler, r.max_calls, r.window_ms, r.created_at, r.updated_at,
    (SELECT count(*) FROM rate_limit_slots s
     WHERE s.handler = r.handler AND s.slot < r.max_calls
       AND s.last_call > now() - r.window_ms * interval '1 millisecond') AS calls_in_window
FROM rate_limits r
ORDER BY r.handler
"""


def list_rate_limits() -> Query[list[RateLimit]]:
    """Every limit, by handler name."""
    return Query(LIST, {}, lambda rows: [_rate_limit(row) for row in rows])


DELETE = """
DELETE FROM rate_limits WHERE handler = %(handler)s RETURNING handler
"""


def delete_rate_limit(handler: str) -> Query[None]:
    """Remove a handler's limit; `NotFound` if it has none."""

    def read(rows: list[Row]) -> None:
        if not rows:
            raise NotFound(f"no rate limit for handler {handler!r}")

    return Query(DELETE, {"handler": handler}, read)


LIMITED = "SELECT handler FROM rate_limits"


def limited_handlers() -> Query[frozenset[str]]:
    """Names of the handlers that have a limit (workers cache this set)."""
    return Query(LIMITED, {}, lambda rows: frozenset(row["handler"] for row in rows))


@dataclass(frozen=True)
class Admission:
    """The answer for one call: go ahead (in `slot`), deferred until a moment, or lost."""

    held: bool
    admitted: bool
    deferred_until: datetime | None
    slot: int | None = None


# One statement per limited call. Locking: the slot is taken with SKIP LOCKED (a slot
# another node is stamping is never waited for); the booking row is updated, so deferrals
# of one handler queue for it briefly; the instance row is only ours (fenced by epoch).
ADMIT = """
WITH fence AS (
    SELECT id FROM instances
    WHERE id = %(id)s AND claim_epoch = %(epoch)s AND state = 'running'
), rule AS (
    SELECT handler, max_calls, window_ms * interval '1 millisecond' AS span
    FROM rate_limits WHERE handler = %(handler)s
), free AS (
    -- The least recently used slot, if its last call has left the window.
    SELECT s.slot FROM rate_limit_slots s, rule
    WHERE s.handler = rule.handler AND s.slot < rule.max_calls
      AND s.last_call <= now() - rule.span AND EXISTS (SELECT 1 FROM fence)
    ORDER BY s.last_call
    LIMIT 1
    FOR UPDATE OF s SKIP LOCKED
), taken AS (
    UPDATE rate_limit_slots s SET last_call = now()
    FROM free WHERE s.handler = %(handler)s AND s.slot = free.slot
    RETURNING s.slot
), booked AS (
    -- No slot: book the first moment a slot frees, one call interval (window / max_calls)
    -- after the previous booking, so deferred steps come back spread out, not all at once.
    UPDATE rate_limits r
    SET next_wake = greatest(
            r.next_wake,
            (SELECT min(s.last_call) FROM rate_limit_slots s
             WHERE s.handler = r.handler AND s.slot < r.max_calls) + rule.span
        ) + rule.span / r.max_calls
    FROM rule
    WHERE r.handler = rule.handler
      AND EXISTS (SELECT 1 FROM fence) AND NOT EXISTS (SELECT 1 FROM taken)
    RETURNING r.next_wake - rule.span / r.max_calls AS wake_at
), deferred AS (
    -- Back to the queue until then: not failed, not an attempt (fenced like every write).
    UPDATE instances i
    SET state = 'scheduled', next_fire_at = booked.wake_at, updated_at = now(),
        claimed_by = NULL, claim_incarnation = NULL, claimed_slot = NULL
    FROM booked
    WHERE i.id = %(id)s AND i.claim_epoch = %(epoch)s AND i.state = 'running'
    RETURNING i.next_fire_at
)
SELECT EXISTS (SELECT 1 FROM fence) AS held,
    NOT EXISTS (SELECT 1 FROM rule) OR EXISTS (SELECT 1 FROM taken) AS admitted,
    (SELECT next_fire_at FROM deferred) AS deferred_until,
    (SELECT slot FROM taken) AS slot
"""


async def admit(
    conn: psycopg.AsyncConnection[Any], instance_id: uuid.UUID, epoch: int, handler: str
) -> Admission:
    """Take a call slot for `handler`, or defer the instance until one will be free.

    A handler without a limit (deleted since the caller looked) is simply admitted.
    """
    params = {"id": instance_id, "epoch": epoch, "handler": handler}
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(ADMIT, params)
        row = await cursor.fetchone()
    assert row is not None  # the final SELECT always returns one row
    held = bool(row["held"]) and (row["admitted"] or row["deferred_until"] is not None)
    return Admission(held, bool(row["admitted"]) and held, row["deferred_until"], row["slot"])


# The admission stamped the slot when it was granted; the handler starts a little later
# (a thread to free up, an event loop to get round to it). Stamping again once it has
# started makes the stamp no earlier than the real start, so the next use of the slot,
# a window after the stamp, is a full window after this call really began. `greatest`:
# a stamp only ever moves later.
RESTAMP = """
UPDATE rate_limit_slots SET last_call = greatest(last_call, now())
WHERE handler = %(handler)s AND slot = %(slot)s
"""


async def restamp(conn: psycopg.AsyncConnection[Any], handler: str, slot: int) -> None:
    """Move a taken slot's stamp to now (called once the admitted call has started)."""
    await conn.execute(RESTAMP, {"handler": handler, "slot": slot})
