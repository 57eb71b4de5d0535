"""The embedded default: started when DATABASE_URL is unset, shared by a second process."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from orch8.database import MINIMUM_SERVER_VERSION, check_pooled, check_server_version
from orch8.errors import ConfigError

SCRIPT = """
import sys, time, psycopg
from orch8.database import resolve_dsn
dsn = resolve_dsn(None, sys.argv[1])
with psycopg.connect(dsn) as conn:
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
print(open(sys.argv[1] + "/postmaster.pid").readline().strip(), flush=True)
sys.stdin.read()  # hold the server until the test closes our stdin
"""


def start_user(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(data_dir)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline() if process.stdout else ""
    assert line.strip().isdigit(), f"no server pid printed: {line!r}"
    return process, int(line)


def test_second_process_reuses_the_embedded_server_and_the_last_one_stops_it(tmp_path):
    data_dir = tmp_path / "postgres"
    first, server_pid = start_user(data_dir)
    second, reused_pid = start_user(data_dir)
    try:
        assert reused_pid == server_pid
        assert psutil.pid_exists(server_pid)
        first.communicate("", timeout=30)
        assert psutil.pid_exists(server_pid), "stopped while another process still used it"
        second.communicate("", timeout=30)
        deadline = time.monotonic() + 15
        while psutil.pid_exists(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == "zombie"
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()


def test_the_test_server_is_a_supported_version(conn):
    assert conn.info.server_version >= MINIMUM_SERVER_VERSION
    check_server_version(conn)


def test_an_older_server_is_refused_with_one_line_naming_both_versions(conn):
    # The real check on the real server, with the minimum raised above it.
    above = conn.info.server_version + 10000
    with pytest.raises(ConfigError) as refused:
        check_server_version(conn, minimum=above)
    message = str(refused.value)
    assert "\n" not in message
    assert message.endswith(f"orch8 needs PostgreSQL {above // 10000} or newer")
    assert f"PostgreSQL {conn.info.server_version // 10000}." in message


async def _pool_after_termination(dsn: str) -> tuple[int, int, int]:
    """Backend pids: of the pooled connection, of the one handed out after that backend
    was terminated, and of the one after that."""
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False,
                               kwargs={"autocommit": True}, check=check_pooled)
    await pool.open(wait=True, timeout=10)
    try:
        async with pool.connection() as conn:
            first = conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
            await other.execute("SELECT pg_terminate_backend(%s)", (first,))
            # The signal that the backend has gone: its row leaves pg_stat_activity.
            while await (await other.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (first,))).fetchone():
                await asyncio.sleep(0.01)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")  # would fail on the terminated connection
            second = conn.info.backend_pid
        async with pool.connection() as conn:
            third = conn.info.backend_pid
    finally:
        await pool.close()
    return first, second, third


def test_the_api_pool_replaces_a_connection_the_server_ended_and_keeps_a_sound_one(dsn):
    first, second, third = asyncio.run(_pool_after_termination(dsn))
    assert second != first  # the dead connection was found and replaced
    assert third == second  # a sound one is handed out again, not replaced


def test_the_api_pool_check_works_past_descriptor_1024(dsn):
    """A busy node can hold more than 1024 descriptors, where `select` refuses to look."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if soft < wanted + 100:
        if hard != resource.RLIM_INFINITY and hard < wanted + 100:
            pytest.skip(f"this process may open only {hard} descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted + 100, hard))
    held = []
    try:
        with open(os.devnull) as devnull:
            while len(held) < wanted:
                held.append(os.dup(devnull.fileno()))
        first, second, third = asyncio.run(_pool_after_termination(dsn))
    finally:
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert second != first and third == second
