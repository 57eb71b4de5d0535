"""Concurrency keys seen from outside the claim: a key's usage, and the wake-up backstop.

The claim (`claims.CLAIM`) seats keyed instances into their key's slots and parks those a
full key cannot take; the triggers of migration 002 free a slot whenever an instance
leaves `running` and wake that key's next waiter. This module holds what else touches
the slots: `key_usage`, and `SlotBackstop`, each worker's periodic `wake_stranded`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from orch8.store.query import Query, Row

log = logging.getLogger("orch8.store.concurrency")

# Lost wake-ups are rare (see WAKE_STRANDED); finding them within a few seconds is enough.
BACKSTOP_INTERVAL_S = 2.0


@dataclass(frozen=True)
class KeyUsage:
    """One concurrency key: its slots, how many are held, how many instances wait."""

    key: str
    slots: int
    running: int
    waiting: int

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "slots": self.slots, "running": self.running,
                "waiting": self.waiting}


USAGE = """
SELECT s.concurrency_key AS key, count(*) AS slots, count(s.instance_id) AS running,
    (SELECT count(*) FROM instances i
     WHERE i.concurrency_key = s.concurrency_key AND i.state = 'scheduled'
       AND i.waiting_for_slot) AS waiting
FROM concurrency_slots s
WHERE s.concurrency_key = %(key)s
GROUP BY s.concurrency_key
"""


def key_usage(key: str) -> Query[KeyUsage | None]:
    """Slots, running and waiting counts of one key; None if no instance ever used it."""

    def read(rows: list[Row]) -> KeyUsage | None:
        return KeyUsage(**rows[0]) if rows else None

    return Query(USAGE, {"key": key}, read)


# Keys with running instances. Only running rows are read (bounded by what the cluster
# has in flight), then each key's slot rows by primary key; waiters are counted up to a
# cap so that a key with a huge backlog costs no more than a bounded index range.
BUSY_KEYS = """
SELECT held.key, held.running,
    (SELECT count(*) FROM concurrency_slots s WHERE s.concurrency_key = held.key) AS slots,
    (SELECT count(*) FROM (
        SELECT 1 FROM instances i
        WHERE i.concurrency_key = held.key AND i.state = 'scheduled' AND i.waiting_for_slot
        LIMIT %(waiting_cap)s) w) AS waiting
FROM (
    SELECT concurrency_key AS key, count(*) AS running
    FROM instances WHERE state = 'running' AND concurrency_key IS NOT NULL
    GROUP BY concurrency_key
) held
ORDER BY held.running DESC, held.key
LIMIT %(limit)s
"""
WAITING_CAP = 10_000


def busy_keys(limit: int = 20) -> Query[list[KeyUsage]]:
    """The keys with running instances, busiest first (`waiting` counted up to a cap)."""
    params = {"limit": limit, "waiting_cap": WAITING_CAP}
    return Query(BUSY_KEYS, params, lambda rows: [KeyUsage(**row) for row in rows])


# The backstop for a wake-up that was lost anyway (a waiter held locked by someone else
# at the moment its slot freed, or slots added while the key's waiters were being
# parked): every key with waiters and a free slot gets one waiter woken. A wake-up too
# many costs nothing: the claim parks that instance again if the key is in fact full.
# The keys with waiters are read by skipping through the waiter index one key at a time,
# so the cost follows the number of such keys, not the number of waiting instances.
WAKE_STRANDED = """
WITH RECURSIVE waiting_key AS (
    (SELECT concurrency_key AS key FROM instances
     WHERE state = 'scheduled' AND waiting_for_slot
     ORDER BY concurrency_key LIMIT 1)
    UNION ALL
    SELECT (SELECT concurrency_key FROM instances
            WHERE state = 'scheduled' AND waiting_for_slot AND concurrency_key > w.key
            ORDER BY concurrency_key LIMIT 1)
    FROM waiting_key w
    WHERE w.key IS NOT NULL
), stranded AS (
    SELECT w.key,
        (SELECT min(slot) FROM concurrency_slots s
         WHERE s.concurrency_key = w.key AND s.instance_id IS NULL) AS slot
    FROM waiting_key w
    WHERE w.key IS NOT NULL
    LIMIT %(limit)s
)
SELECT count(orch8_wake_slot_waiter(key, slot)::text) AS keys
FROM stranded
WHERE slot IS NOT NULL
"""


def wake_stranded(limit: int = 1000) -> Query[int]:
    """Wake one waiter of every key (up to `limit` keys) that has a free slot; how many."""
    return Query(WAKE_STRANDED, {"limit": limit}, lambda rows: int(rows[0]["keys"]))


class SlotBackstop:
    """Runs `wake_stranded` every `interval_s`: the slots' backstop for lost wake-ups."""

    def __init__(self, pool: AsyncConnectionPool,
                 interval_s: float = BACKSTOP_INTERVAL_S) -> None:
        self._pool = pool
        self._interval_s = interval_s

    async def run_once(self) -> int:
        """Wake the waiters of keys with a free slot, once; how many keys."""
        async with self._pool.connection() as conn:
            woken = await wake_stranded().run_async(conn)
        if woken:
            log.info("woke waiters of %d concurrency keys with a free slot", woken)
        return woken

    async def run(self, stop: asyncio.Event) -> None:
        """`run_once` every `interval_s` until `stop`; a database error waits a round."""
        while not stop.is_set():
            try:
                await self.run_once()
            except (psycopg.OperationalError, OSError) as error:
                log.warning("concurrency backstop failed (%s); trying next round", error)
            try:
                await asyncio.wait_for(stop.wait(), self._interval_s)
            except TimeoutError:
                pass
