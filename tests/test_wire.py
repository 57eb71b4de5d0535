"""The held claim's wire (`orch8.store.wire`): statements sent through libpq's pipeline
mode read back as psycopg reads them, errors raised as psycopg raises them, and a
connection whose state is unknown never handed back as if it were fine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest

from orch8.store import wire

T = TypeVar("T")

ROWS_SQL = ("SELECT %(id)s::uuid AS id, %(n)s::int + g AS n, %(doc)s::jsonb AS doc, "
            "'50%%' AS percent FROM generate_series(1, 3) AS g")
ROWS = wire.Statement.of("test_rows", ROWS_SQL)
DIVIDE = wire.Statement.of("test_divide", "SELECT 1 / %(zero)s::int")
INSERT = wire.Statement.of("test_insert", "INSERT INTO wire_test (v) VALUES (%(v)s)")


def on_connection(dsn: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
    async def run() -> T:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await work(conn)

    return asyncio.run(run())


PREPARED = "SELECT name FROM pg_prepared_statements WHERE name LIKE 'orch8_test_%%' ORDER BY 1"


def test_placeholders_are_numbered_by_name_in_order_of_first_use() -> None:
    statement = wire.Statement.of("s", "SELECT %(b)s, %(a)s, %(b)s, 'x%%y'")
    assert statement.name == b"orch8_s"
    assert statement.text == b"SELECT $1, $2, $1, 'x%y'"
    assert statement.params == ("b", "a")


def test_rows_come_back_as_a_cursor_reads_them(dsn: str) -> None:
    instance = uuid.uuid4()
    params = {"id": instance, "n": 10, "doc": '{"k": [1, 2]}'}

    async def work(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Any], list[Any]]:
        async with wire.Pipeline(conn) as pipeline:
            sent = pipeline.send(ROWS, params)
            await pipeline.sync()
            ours = pipeline.rows(sent, tuple)
        cursor = await conn.execute(ROWS_SQL, params)
        return ours, await cursor.fetchall()

    ours, theirs = on_connection(dsn, work)
    assert ours == theirs == [(instance, 11, {"k": [1, 2]}, "50%"),
                              (instance, 12, {"k": [1, 2]}, "50%"),
                              (instance, 13, {"k": [1, 2]}, "50%")]


def test_a_statement_is_prepared_once_per_connection(dsn: str) -> None:
    async def work(conn: psycopg.AsyncConnection[Any]) -> list[int]:
        taken = []
        for n in range(3):  # three blocks, one connection
            async with wire.Pipeline(conn) as pipeline:
                sent = pipeline.send(ROWS, {"id": uuid.uuid4(), "n": n, "doc": "{}"})
            taken.append(pipeline.rows(sent, tuple)[0][1])
        cursor = await conn.execute(PREPARED)
        assert await cursor.fetchall() == [("orch8_test_rows",)]
        return taken

    assert on_connection(dsn, work) == [1, 2, 3]
    # A new session prepares it again (the server forgot it with the old one).
    assert on_connection(dsn, work) == [1, 2, 3]


def test_an_error_is_raised_as_psycopg_raises_it_and_stops_the_round_trip(dsn: str) -> None:
    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("CREATE TABLE wire_test (v int)")
        pipeline = wire.Pipeline(conn)
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with pipeline:
                begin = pipeline.send(b"BEGIN")
                before = pipeline.send(INSERT, {"v": 1})
                again = pipeline.send(INSERT, {"v": 2})  # (prepared once, by the first)
                failing = pipeline.send(DIVIDE, {"zero": 0})
                after = pipeline.send(ROWS, {"id": uuid.uuid4(), "n": 0, "doc": "{}"})
                commit = pipeline.send(b"COMMIT")
                await pipeline.sync()
        assert (begin.ok, before.ok, again.ok, failing.ok, after.ok, commit.ok) == (
            True, True, True, False, False, False)
        # The round trip was read to its end: the connection is open, in the failed
        # transaction, for its owner (the pool) to roll back.
        assert not conn.closed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        await conn.rollback()
        cursor = await conn.execute("SELECT count(*) FROM wire_test")
        assert await cursor.fetchall() == [(0,)]
        # The statement that failed was prepared (its prepare ran before the error); the
        # one after the error was not (the server skipped its prepare too): it is
        # prepared when next sent, and all of them run now.
        async with wire.Pipeline(conn) as pipeline:
            divided = pipeline.send(DIVIDE, {"zero": 1})
            inserted = pipeline.send(INSERT, {"v": 3})
            rows = pipeline.send(ROWS, {"id": uuid.uuid4(), "n": 0, "doc": "{}"})
        assert pipeline.rows(divided, tuple) == [(1,)] and inserted.ok
        assert [row[1] for row in pipeline.rows(rows, tuple)] == [1, 2, 3]
        cursor = await conn.execute(PREPARED)
        assert await cursor.fetchall() == [
            ("orch8_test_divide",), ("orch8_test_insert",), ("orch8_test_rows",)]

    on_connection(dsn, work)


def test_a_statement_that_fails_to_prepare_fails_the_same_way_again(dsn: str) -> None:
    broken = wire.Statement.of("test_broken", "SELECT * FROM no_such_table")

    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        for _ in range(2):  # not "prepared statement does not exist" the second time
            with pytest.raises(psycopg.errors.UndefinedTable):
                async with wire.Pipeline(conn) as pipeline:
                    pipeline.send(broken)
            assert not conn.closed

    on_connection(dsn, work)


def test_a_block_left_while_replies_are_due_closes_its_connection(dsn: str) -> None:
    """A cancelled round trip: the transaction it was in never commits, and the
    connection is closed rather than handed back mid-conversation."""
    seen: dict[str, Any] = {}

    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("CREATE TABLE wire_test (v int)")
        seen["pid"] = conn.info.backend_pid

        async def stuck() -> None:
            async with wire.Pipeline(conn) as pipeline:
                pipeline.send(b"BEGIN")
                pipeline.send(INSERT, {"v": 1})
                pipeline.send(wire.Statement.of("test_sleep", "SELECT pg_sleep(30)"))
                pipeline.send(b"COMMIT")
                await pipeline.sync()

        task = asyncio.create_task(stuck())
        # Wait for the server to be in the sleep (a row of pg_stat_activity), then cancel.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher:
            await until(watcher, "SELECT 1 FROM pg_stat_activity WHERE pid = %s "
                        "AND query LIKE '%%pg_sleep%%'", seen["pid"])
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert conn.closed
            # The server ends the session once it finds its client gone (at the latest
            # when the sleep is cut short below); nothing of its transaction remains.
            await watcher.execute("SELECT pg_cancel_backend(%s)", (seen["pid"],))
            await until(watcher, "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity "
                        "WHERE pid = %s)", seen["pid"])
            cursor = await watcher.execute("SELECT count(*) FROM wire_test")
            assert await cursor.fetchall() == [(0,)]

    on_connection(dsn, work)


def test_a_lost_session_is_an_operational_error(dsn: str) -> None:
    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
            await other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            await until(other, "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity "
                        "WHERE pid = %s)", conn.info.backend_pid)
        with pytest.raises(psycopg.OperationalError):
            async with wire.Pipeline(conn) as pipeline:
                pipeline.send(ROWS, {"id": uuid.uuid4(), "n": 1, "doc": "{}"})
        assert conn.closed

    on_connection(dsn, work)


async def until(conn: psycopg.AsyncConnection[Any], query: str, *params: Any,
                timeout_s: float = 30) -> None:
    """Poll `query` until it returns a row (a real signal, with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cursor = await conn.execute(query, params)
        if await cursor.fetchall():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never true: {query}")
