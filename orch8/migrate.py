"""Apply `migrations/NNN_verb_object.sql` in order, once each, under an advisory lock.

Several nodes may start at once: the transaction-scoped advisory lock makes the second
wait for the first and then find nothing left to do. Each file runs in the same
transaction as its `schema_migrations` row, so a failed file leaves no trace.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg

from orch8.database import check_server_version

log = logging.getLogger("orch8.migrate")

# Any fixed 64-bit number shared by every orch8 node; "orch8mig" in ASCII.
MIGRATION_LOCK_ID = 0x6F726368386D6967

_FILE_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
LOCK = "SELECT pg_advisory_xact_lock(%(lock_id)s)"
APPLIED = "SELECT version FROM schema_migrations"
RECORD = "INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s)"


def migrations_dir() -> Path:
    """The folder of SQL files: packaged inside the wheel, or the repository's own."""
    packaged = Path(__file__).parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def pending_files(folder: Path, applied: set[int]) -> list[tuple[int, Path]]:
    """The migration files not yet applied, in version order."""
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name {path.name!r} is not NNN_verb_object.sql")
        version = int(match.group(1))
        if version not in applied:
            found.append((version, path))
    return found


def migrate(dsn: str) -> list[str]:
    """Bring the schema up to date; return the names of the files applied now.

    `ConfigError` if the server is older than orch8 supports (nodes and `orch8 migrate`
    start here, so they stop with that one line).
    """
    applied_now: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        check_server_version(conn)
        with conn.transaction():
            conn.execute(LOCK, {"lock_id": MIGRATION_LOCK_ID})
            conn.execute(CREATE_TABLE)
            applied = {row[0] for row in conn.execute(APPLIED)}
            for version, path in pending_files(migrations_dir(), applied):
                conn.execute(path.read_text())
                conn.execute(RECORD, {"version": version, "name": path.name})
                applied_now.append(path.name)
    for name in applied_now:
        log.info("applied migration %s", name)
    return applied_now
