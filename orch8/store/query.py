"""`Query`: one statement, its parameters and how to read its rows, runnable sync or async."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.rows import dict_row

from orch8.errors import Conflict, DefinitionError

T = TypeVar("T")
Row = dict[str, Any]


@dataclass(frozen=True)
class Query(Generic[T]):
    sql: str
    params: dict[str, Any]
    read: Callable[[list[Row]], T]

    def run(self, conn: psycopg.Connection[Any]) -> T:
        """Run on a synchronous connection (inside the caller's transaction, if any)."""
        try:
            with conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(self.sql, self.params)
                rows = cursor.fetchall() if cursor.description else []
        except psycopg.errors.IntegrityError as error:
            raise _translate(error) from None
        return self.read(rows)

    async def run_async(self, conn: psycopg.AsyncConnection[Any]) -> T:
        """Run on an asynchronous connection."""
        try:
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(self.sql, self.params)
                rows = await cursor.fetchall() if cursor.description else []
        except psycopg.errors.IntegrityError as error:
            raise _translate(error) from None
        return self.read(rows)


def _translate(error: psycopg.errors.IntegrityError) -> Exception:
    """psycopg errors stop at the store: callers see the project's own classes."""
    constraint = getattr(error.diag, "constraint_name", None) or "constraint"
    if isinstance(error, psycopg.errors.UniqueViolation):
        return Conflict(f"conflicts with an existing row ({constraint})")
    return DefinitionError(constraint, "violates a database constraint")
