"""The held claim's round trips, sent through libpq's pipeline mode without psycopg's
cursor machinery.

While a backlog lasts, a worker sends three statements per batch of claimed instances
(the batch's write, its COMMIT, the next batch's lock) and waits once. Through psycopg's
asyncio pipeline, that one round trip cost about 190 µs of the worker's CPU in Python
(cursor objects, generators, a future and a reader registered per wait), against 25 µs
sent through the connection's libpq handle directly (a throwaway script, three trivial
statements per round trip, 3,000 round trips). On a batch of 100 that is about 2 µs per
instance of a worker that spends 11 to 14 in all, on two cores it shares with PostgreSQL.

So the held claim (`claims.lock_due`, `claims.settle_locked`) sends its statements with
psycopg's documented low-level parts: `psycopg.pq` (the libpq wrapper: prepare, send,
pipeline sync, read results) and `psycopg.adapt.Transformer` (psycopg's own loaders, the
same C code that builds a cursor's rows). The connection is still a psycopg connection
from the worker's pool: a `Pipeline` takes it over for its block and gives it back idle
(or in a failed transaction, for the pool to roll back), or closes it when its state is
unknown (an exception between a send and its reply), so the pool replaces it.

What psycopg would do for these statements and this module does too: each statement is
prepared once per connection (named `orch8_<name>`; libpq's own prepared statements, so
psycopg's cache never sees them), parameters are sent as text, a server error is raised
as psycopg raises it (`psycopg.errors.error_from_result`), a lost connection as
`psycopg.OperationalError`. Notices still reach the connection's notice handlers.
"""

from __future__ import annotations

import asyncio
import re
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer

T = TypeVar("T")

_NAMED = re.compile(r"%\((\w+)\)s|%%")


@dataclass(frozen=True)
class Statement:
    """A statement as libpq prepares it: `$n` placeholders, and the names of the
    parameters (`%(name)s` in the text it was written as) in their order."""

    name: bytes
    text: bytes
    params: tuple[str, ...]

    @classmethod
    def of(cls, name: str, sql: str) -> Statement:
        """`sql`, written with psycopg's `%(name)s` placeholders, numbered for libpq."""
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) is None:
                return "%"  # (`%%`: a literal percent sign in psycopg's syntax)
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        return cls(f"orch8_{name}".encode(), _NAMED.sub(number, sql).encode(), tuple(names))


class Sent:
    """One statement sent in a `Pipeline`: its result once the round trip that carried it
    has been read (None until then, and for a statement never answered)."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: pq.abc.PGresult | None = None

    @property
    def ok(self) -> bool:
        """It ran without an error (for a COMMIT: it committed; one after an error in its
        round trip was not run)."""
        return self.result is not None and self.result.status in _DONE


_DONE = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)

# The statements prepared on each connection (libpq's names). A connection forgets its
# entry when it is garbage collected; the server forgets the statements with the session.
_prepared: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], set[bytes]] = (
    weakref.WeakKeyDictionary())


def _text(value: Any) -> bytes | None:
    """A parameter in PostgreSQL's text format (what the held claim sends: text, numbers,
    UUIDs, documents already encoded as JSON text)."""
    if value is None:
        return None
    if isinstance(value, (str, int, uuid.UUID)):
        return str(value).encode()
    raise TypeError(f"cannot send a {type(value).__name__} as a held claim's parameter")


class Pipeline:
    """A block in which statements are sent on `conn` in libpq's pipeline mode and read
    back at each `sync()`, one round trip each.

    Leaving the block syncs what was sent since the last `sync()` (its errors raised). If
    the block is left while replies are still due (an exception or a cancellation between
    a send and its reply), the connection is closed: what it would answer, and whether its
    transaction is still open, is unknown; a closed connection ends that transaction, and
    the pool replaces it.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._prepared = _prepared.setdefault(conn, set())
        self._transformer = Transformer(conn)
        # Sent and not yet answered, in order: (its reply, the name it prepares, if any).
        self._sent: list[tuple[Sent, bytes | None]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._lost: psycopg.OperationalError | None = None
        self._loop = asyncio.get_running_loop()
        self._socket = -1  # (while reading it)

    async def __aenter__(self) -> Pipeline:
        self._pg.enter_pipeline_mode()
        # One reader for the whole block (not one per wait): it reads what arrives into
        # libpq's buffer, so the socket never stays readable, and wakes the waiting sync.
        self._socket = self._pg.socket
        self._loop.add_reader(self._socket, self._readable)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        try:
            if kind is None and self._sent:
                await self.sync()
        finally:
            self._stop_reading()
            if self._sent or self._lost is not None:
                self._pg.finish()  # its state is unknown: the pool drops a closed connection
            else:
                try:
                    self._pg.exit_pipeline_mode()
                except psycopg.OperationalError:
                    self._pg.finish()

    def send(self, statement: Statement | bytes,
             params: Mapping[str, Any] | None = None) -> Sent:
        """Queue `statement` (a `Statement`, prepared on this connection the first time it
        is sent; or a short command such as b"COMMIT", sent as is) with `params`; it is
        answered at the next `sync()`."""
        sent = Sent()
        if isinstance(statement, bytes):
            self._pg.send_query_params(statement, None)
            self._sent.append((sent, None))
            return sent
        if statement.name not in self._prepared:
            self._pg.send_prepare(statement.name, statement.text)
            self._prepared.add(statement.name)  # (taken back if the prepare fails)
            self._sent.append((Sent(), statement.name))
        values = [_text(params[name]) for name in statement.params] if params else None
        self._pg.send_query_prepared(statement.name, values)
        self._sent.append((sent, None))
        return sent

    async def sync(self) -> None:
        """Send what was queued and read every reply; raise the first error among them
        (the statements after it in the same round trip are not run)."""
        pg = self._pg
        pg.pipeline_sync()
        while pg.flush():  # (1: the socket's buffer is full: let the server read)
            await self._wait(writable=True)
        first_error: psycopg.Error | None = None
        for reply, preparing in self._sent:
            result = await self._next_result()
            reply.result = result
            if result.status == pq.ExecStatus.FATAL_ERROR and first_error is None:
                first_error = psycopg.errors.error_from_result(
                    result, encoding=self._conn.info.encoding)
            if preparing is not None and result.status != pq.ExecStatus.COMMAND_OK:
                self._prepared.discard(preparing)  # failed, or not run (after an error)
        result = await self._next_result()
        if result.status != pq.ExecStatus.PIPELINE_SYNC:
            # Out of step with the server (`_sent` stays: the connection is closed).
            raise psycopg.OperationalError(
                f"unexpected reply in a pipeline: {pq.ExecStatus(result.status).name}")
        self._sent = []
        if first_error is not None:
            raise first_error

    def rows(self, sent: Sent, make_row: Callable[[Sequence[Any]], T]) -> list[T]:
        """The rows `sent` returned, each built by `make_row` from its values (loaded by
        the connection's loaders, as a cursor's are)."""
        result = sent.result
        if result is None or result.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.ProgrammingError("the statement returned no rows")
        self._transformer.set_pgresult(result)
        return self._transformer.load_rows(0, result.ntuples, make_row)

    async def _next_result(self) -> pq.abc.PGresult:
        """The next result libpq has for this pipeline (the empty markers between one
        statement's results and the next's skipped)."""
        pg = self._pg
        while True:
            marker = False
            while not pg.is_busy():
                result = pg.get_result()
                if result is not None:
                    return result
                if pg.status == pq.ConnStatus.BAD:
                    raise psycopg.OperationalError(
                        f"the connection was lost: {pg.get_error_message()}")
                if marker:
                    break  # (two markers in a row: nothing more has arrived yet)
                marker = True
            await self._wait()

    async def _wait(self, writable: bool = False) -> None:
        if self._lost is not None:
            raise self._lost
        waiter = self._waiter = self._loop.create_future()
        if writable:
            self._loop.add_writer(self._socket, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if writable:
                self._loop.remove_writer(self._socket)
        if self._lost is not None:
            raise self._lost

    def _readable(self) -> None:
        try:
            self._pg.consume_input()
        except psycopg.OperationalError as error:
            self._lost = error
            self._stop_reading()  # (a dead socket stays readable)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _stop_reading(self) -> None:
        if self._socket >= 0:
            self._loop.remove_reader(self._socket)
            self._socket = -1
