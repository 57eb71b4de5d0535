"""Shared set-up for the benchmarks: a scratch database, and a backlog released at once."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from orch8.database import resolve_dsn
from orch8.migrate import migrate


def server_dsn() -> str:
    """DATABASE_URL if set, else an embedded server in a scratch directory."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    scratch = Path(tempfile.gettempdir()) / "orch8-bench"
    scratch.mkdir(exist_ok=True)
    return resolve_dsn(None, str(scratch / "postgres"))


def scratch_database(server: str) -> str:
    """A new, migrated database for one benchmark run; returns its DSN."""
    name = f"orch8_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server, dbname=name)
    migrate(dsn)
    return dsn


def drop_database(server: str, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def park_backlog(dsn: str, count: int, sequence: str = "bench") -> None:
    """Insert `count` one-step noop instances, due far in the future (not claimable yet)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sequences (name, version, steps) VALUES (%s, 1, "
            "'[{\"id\": \"only\", \"handler\": \"noop\", \"params\": {}}]') ON CONFLICT DO NOTHING",
            (sequence,))
        conn.execute(
            "INSERT INTO instances (id, sequence_name, sequence_version, next_fire_at) "
            "SELECT gen_random_uuid(), %s, 1, 'infinity' FROM generate_series(1, %s)",
            (sequence, count))
        conn.execute("ANALYZE instances")


def release_backlog(dsn: str) -> None:
    """Make the parked backlog due now, and wake the workers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE instances SET next_fire_at = now() WHERE next_fire_at = 'infinity'")
        conn.execute("SELECT pg_notify('orch8_work', '')")


def drained_rate(dsn: str, count: int) -> float | None:
    """Instances per second from release to the last completion, by the database clock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'completed'), "
            "extract(epoch FROM max(finished_at) - min(claimed_at)) "
            "FROM instances").fetchone()
    done, seconds = row
    if done < count or not seconds:
        return None
    return count / float(seconds)
