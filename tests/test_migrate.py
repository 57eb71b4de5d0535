"""Migrations from an empty database, once each, safe when nodes start together."""

from __future__ import annotations

import threading

import psycopg
import pytest

from orch8.migrate import migrate, migrations_dir, pending_files
from tests.databases import scratch_database


@pytest.fixture
def empty_dsn(server_dsn):
    with scratch_database(server_dsn, prefix="orch8_empty") as empty:
        yield empty


def test_migrate_from_empty_then_nothing_to_do(empty_dsn):
    files = sorted(path.name for path in migrations_dir().glob("*.sql"))
    assert migrate(empty_dsn) == files
    assert migrate(empty_dsn) == []
    with psycopg.connect(empty_dsn) as conn:
        recorded = [row[0] for row in conn.execute(
            "SELECT name FROM schema_migrations ORDER BY version")]
        tables = {row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert recorded == files
    assert {"sequences", "instances", "step_outputs", "cluster_nodes"} <= tables


def test_nodes_starting_together_apply_each_file_once(empty_dsn):
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(empty_dsn))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(path.name for path in migrations_dir().glob("*.sql"))


def test_migration_file_names_are_checked(tmp_path):
    (tmp_path / "001_create_things.sql").write_text("SELECT 1")
    (tmp_path / "2_bad.sql").write_text("SELECT 1")
    with pytest.raises(ValueError, match="2_bad.sql"):
        pending_files(tmp_path, set())


def test_pending_files_skip_what_was_applied(tmp_path):
    for name in ("001_create_a.sql", "002_add_b.sql", "003_drop_c.sql"):
        (tmp_path / name).write_text("SELECT 1")
    assert [v for v, _ in pending_files(tmp_path, {1, 3})] == [2]
