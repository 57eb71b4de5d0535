"""The PostgreSQL server a run measures on, and the scratch databases it creates there.

`DATABASE_URL` if set (its role must be allowed to create databases), else an embedded
server in a scratch data directory that stops when the run exits. Every measurement gets
a database of its own, cloned from a migrated template, and dropped afterwards.
"""

from __future__ import annotations

import itertools
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from orch8.database import resolve_dsn
from orch8.migrate import migrate
from supervisor.processes import exists

# The embedded server's data directory when DATABASE_URL is unset: one for every bench
# entry point, so they share one server (and its warm caches) rather than start several.
DATA_DIR = Path(tempfile.gettempdir()) / "orch8-bench" / "postgres"

# Every database a run makes here is named `<PREFIX>_<its process id>_<a counter>`.
PREFIX = "orch8_bench"

SERVER_FACTS = """
SELECT current_setting('server_version') AS version,
       current_setting('shared_buffers') AS shared_buffers,
       current_setting('synchronous_commit') AS synchronous_commit,
       current_setting('fsync') AS fsync,
       current_setting('max_connections') AS max_connections,
       current_setting('autovacuum') AS autovacuum
"""


class Server:
    """One PostgreSQL server; `database()` hands out fresh databases on it."""

    def __init__(self, dsn: str, embedded: bool) -> None:
        self.dsn = dsn
        self.embedded = embedded
        self._template: str | None = None

    @classmethod
    def open(cls, data_dir: Path) -> Server:
        url = os.environ.get("DATABASE_URL")
        if url:
            return cls(url, embedded=False)
        dsn = resolve_dsn(None, str(data_dir))
        # (Only here: the embedded server's databases were all made by this machine's
        # processes, so a name's process id says whether its run is still alive.)
        drop_leftovers(dsn)
        return cls(dsn, embedded=True)

    def facts(self) -> dict[str, Any]:
        """The server and machine every figure of the run came from."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.cursor(row_factory=psycopg.rows.dict_row)
            server = cursor.execute(SERVER_FACTS).fetchone() or {}
        return {
            "postgresql": {**server, "embedded": self.embedded},
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.machine(), "python": sys.version.split()[0]},
        }

    @contextmanager
    def database(self, migrated: bool = True) -> Iterator[str]:
        """A new database (migrated for orch8, or empty for the raw loop and pgqueuer)."""
        name = database_name()
        template = self._migrated_template() if migrated else "template0"
        self._execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
        try:
            yield self.dsn_of(name)
        finally:
            self._drop(name)

    def dsn_of(self, name: str) -> str:
        return make_conninfo(self.dsn, dbname=name)

    def close(self) -> None:
        if self._template is not None:
            self._drop(self._template)
            self._template = None

    def _migrated_template(self) -> str:
        if self._template is None:
            name = database_name()
            self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            migrate(self.dsn_of(name))
            self._template = name
        return self._template

    def _drop(self, name: str) -> None:
        self._execute(_dropping(name))

    def _execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement)


# A name `database_name` gives, its process id captured.
LEFTOVER = rf"^{PREFIX}_([0-9]+)_[0-9]+$"
_COUNTER = itertools.count()


def database_name() -> str:
    """A name for a new bench database, unique on the server while this process lives
    (`drop_leftovers` drops it once the process is gone)."""
    return f"{PREFIX}_{os.getpid()}_{next(_COUNTER)}"


def drop_leftovers(dsn: str) -> list[str]:
    """Drop the databases that runs no longer alive left on the server at `dsn` (a run
    killed before `Server.close` and its `database()` blocks could drop them: a migrated
    template and a scratch database each, kept until now); return their names. Only for a
    server whose bench databases were all made on this machine: a process id is only
    meaningful here."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT datname, (regexp_match(datname, %(pattern)s))[1]::int "
                            "FROM pg_database WHERE datname ~ %(pattern)s",
                            {"pattern": LEFTOVER}).fetchall()
        left = sorted(name for name, pid in rows if not exists(pid))
        for name in left:
            conn.execute(_dropping(name))
    return left


def _dropping(name: str) -> sql.Composed:
    return sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))


def commit_stamped(conn: psycopg.Connection[Any]) -> datetime:
    """Commit `conn`'s transaction; return the database clock read just before the commit.
    What it wrote becomes visible at the commit, never before that time, so a drain timed
    from it is never too fast (at most the commit's own duration too slow); a time read
    after the commit could come after the first claims."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    conn.commit()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]
