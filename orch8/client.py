"""`orch8.Client`: drive orch8 from Python, straight through PostgreSQL.

`enqueue(conn, ...)` creates an instance inside the caller's own transaction: it exists
only if that transaction commits, so "save the order and start its workflow" is atomic.
"""

from __future__ import annotations

import builtins
import os
import time
import uuid
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from orch8.database import check_server_version, resolve_dsn
from orch8.errors import DefinitionError
from orch8.migrate import migrate
from orch8.model import TERMINAL_STATES, State, parse_name, parse_steps
from orch8.requests import parse_new_instance
from orch8.store import instances, rate_limits, sequences
from orch8.store.instances import Created, Instance, NewInstance
from orch8.store.query import Query
from orch8.store.rate_limits import RateLimit
from orch8.store.sequences import Sequence

MAX_BATCH = 10_000
T = TypeVar("T")


class Client:
    """A small pool of connections and one method per operation."""

    def __init__(self, dsn: str | None = None, *, data_dir: str | None = None) -> None:
        """Connect to `dsn`, else `DATABASE_URL`, else the embedded server in `data_dir`
        (default `ORCH8_DATA_DIR`, else the same place a node uses), as a node would."""
        dsn = dsn or os.environ.get("DATABASE_URL") or None
        if dsn is None:
            dsn = resolve_dsn(None, data_dir or os.environ.get("ORCH8_DATA_DIR") or None)
            # A script may start the embedded server before any node has run: make sure
            # the schema is there (under the same lock nodes take; a no-op when it is).
            migrate(dsn)
        self._dsn = dsn
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True,
            name="orch8-client",
        )
        try:
            with self._pool.connection() as conn:
                check_server_version(conn)
        except BaseException:
            self._pool.close()
            raise

    @property
    def dsn(self) -> str:
        """The database this client uses (the embedded server's when none was named), for
        an application's own connections, such as the one it gives `enqueue`."""
        return self._dsn

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, query: Query[T]) -> T:
        with self._pool.connection() as conn:
            return query.run(conn)

    def create_sequence(self, name: str, steps: list[dict[str, Any]]) -> Sequence:
        """Store a definition; under an existing name it becomes the next version."""
        return self._run(sequences.create_sequence(parse_name(name), parse_steps(steps)))

    def get_sequence(self, name: str, version: int | None = None) -> Sequence:
        return self._run(sequences.get_sequence(name, version))

    def list_sequences(self) -> list[Sequence]:
        return self._run(sequences.list_sequences())

    def start(self, sequence: str, input: dict[str, Any] | None = None, **options: Any) -> Created:
        """Create one instance. Options: version, priority, delay_ms, run_at,
        idempotency_key, concurrency_key, max_concurrency."""
        return self._run(instances.create_instance(_request(sequence, input, options)))

    def start_many(self, requests: list[dict[str, Any]]) -> list[Created]:
        """Create many instances in one transaction: all of them, or none."""
        parsed = _batch(requests)
        with self._pool.connection() as conn, conn.transaction():
            return instances.create_instances(parsed).run(conn)

    def get(self, instance_id: uuid.UUID | str) -> Instance:
        return self._run(instances.get_instance(uuid.UUID(str(instance_id))))

    def list(self, **filters: Any) -> list[Instance]:
        """Filters: state, sequence, concurrency_key, before (an id), limit."""
        return self._run(instances.list_instances(**filters))

    def cancel(self, instance_id: uuid.UUID | str) -> None:
        self._run(instances.cancel_instance(uuid.UUID(str(instance_id))))

    def retry(self, instance_id: uuid.UUID | str) -> None:
        self._run(instances.retry_instance(uuid.UUID(str(instance_id))))

    def queue_depth(self) -> dict[str, int]:
        return self._run(instances.queue_depth())

    def set_rate_limit(self, handler: str, max_calls: int, window_ms: int) -> RateLimit:
        """Allow `handler` at most `max_calls` calls in any `window_ms`, cluster-wide."""
        return self._run(rate_limits.set_rate_limit(handler, max_calls, window_ms))

    def list_rate_limits(self) -> builtins.list[RateLimit]:
        return self._run(rate_limits.list_rate_limits())

    def delete_rate_limit(self, handler: str) -> None:
        """Remove a handler's limit; `NotFound` if it has none."""
        self._run(rate_limits.delete_rate_limit(handler))

    def wait(self, instance_id: uuid.UUID | str, timeout_s: float = 60.0,
             poll_s: float = 0.05) -> Instance:
        """Poll until the instance is completed, failed or cancelled; TimeoutError after."""
        deadline = time.monotonic() + timeout_s
        while True:
            instance = self.get(instance_id)
            if instance.state in TERMINAL_STATES:
                return instance
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {instance_id} still {instance.state}")
            time.sleep(poll_s)


def enqueue(conn: psycopg.Connection[Any], sequence: str,
            input: dict[str, Any] | None = None, **options: Any) -> Created:
    """Create an instance with the caller's connection, inside the caller's transaction."""
    return instances.create_instance(_request(sequence, input, options)).run(conn)


def enqueue_many(conn: psycopg.Connection[Any], requests: list[dict[str, Any]]) -> list[Created]:
    """Create many instances (bodies as `Client.start_many` takes them) with the caller's
    connection, inside the caller's transaction: all of them, or none. A batch that fails
    is undone alone (a savepoint) and the caller's transaction goes on; on a connection in
    autocommit mode the batch is a transaction of its own."""
    create = instances.create_instances(_batch(requests))
    if conn.autocommit:
        with conn.transaction():
            return create.run(conn)
    # (Not `conn.transaction()`: outside a transaction it would begin one and commit it at
    # the end of its block. The savepoint begins the caller's transaction if none is open.)
    conn.execute("SAVEPOINT orch8_enqueue_many")
    try:
        created = create.run(conn)
    except Exception:
        conn.execute("ROLLBACK TO SAVEPOINT orch8_enqueue_many")
        raise
    conn.execute("RELEASE SAVEPOINT orch8_enqueue_many")
    return created


def _batch(requests: list[dict[str, Any]]) -> list[NewInstance]:
    if len(requests) > MAX_BATCH:
        raise DefinitionError("instances", f"at most {MAX_BATCH} per batch")
    return [parse_new_instance(body) for body in requests]


def _request(sequence: str, input: dict[str, Any] | None, options: dict[str, Any]) -> NewInstance:
    body = {"sequence": sequence, "input": input or {}}
    if "priority" in options and hasattr(options["priority"], "name"):
        options = options | {"priority": options["priority"].name.lower()}
    return parse_new_instance(body | options)


__all__ = ["Client", "enqueue", "State"]
