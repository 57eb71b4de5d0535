"""One `Settings` object: read from the environment, validated once, pickled into workers.

Every `ORCH8_*` variable the project understands is declared in `FIELDS`; an unknown one
is a typo that would otherwise be silently ignored, so it stops start-up with a message
naming it. Command-line flags override the environment by building `Settings` from a
copy of the environment with the flags written in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from orch8.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    node_id: str | None = None
    data_dir: str | None = None
    workers: int = max(1, os.cpu_count() or 1)
    heartbeat_interval_s: float = 10.0
    stale_threshold_s: float = 60.0
    # As many as a worker may hold: while a backlog lasts a worker holds one batch (the one
    # running, or the one being written and replaced by the same statement), so a claim
    # of the whole allowance holds no more than two of half of it did, in half the
    # statements (drains 1.15-1.24 times as fast; README, Performance).
    batch_size: int = 100
    tick_interval_ms: int = 100
    max_in_flight: int = 100
    handlers: tuple[str, ...] = ()
    bind: str = "127.0.0.1:8080"
    drain_timeout_s: float = 300.0
    log_level: str = "INFO"
    api_token: str | None = None
    insecure: bool = False
    # Group commit: how long the outcome writer waits to gather more (0: it batches
    # whatever arrived while its previous write was in flight, which measured as fast).
    commit_linger_ms: float = 0.0
    # Most step outcomes one group-commit statement carries; 1 turns group commit off.
    commit_max_batch: int = 500
    # A worker that sends its supervisor no report for this long is killed and restarted.
    worker_timeout_s: float = 30.0
    # The HTTP API (served by the supervisor): database connections for its requests;
    # requests worked on at once (the excess is refused at once with 503 and Retry-After);
    # the listen backlog (bursts of new connections wait here instead of losing SYNs); how
    # long a request's body may take to arrive (a slow sender is answered 408).
    api_pool_size: int = 4
    api_max_requests: int = 64
    api_backlog: int = 1024
    api_read_timeout_s: float = 10.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default `os.environ`), rejecting unknown keys."""
        environ = os.environ if environ is None else environ
        known = {variable for variable, _, _ in FIELDS} | IGNORED_KEYS
        for key in environ:
            if key.startswith("ORCH8_") and key not in known:
                raise ConfigError(f"unknown environment variable {key}")
        values: dict[str, Any] = {}
        for variable, field_name, parse in FIELDS:
            raw = environ.get(variable)
            if raw is None or raw == "":
                continue
            try:
                values[field_name] = parse(raw)
            except ValueError as error:
                raise ConfigError(f"{variable}: {error}") from None
        if "batch_size" not in values and "max_in_flight" in values:
            values["batch_size"] = _default_batch(values["max_in_flight"])
        return cls(**values).validated()

    def validated(self) -> Settings:
        """Return self, or raise `ConfigError` naming the first value out of range."""
        checks = [
            ("ORCH8_WORKERS", self.workers >= 1 and self.workers <= 256),
            ("ORCH8_HEARTBEAT_INTERVAL_SECS", 0 < self.heartbeat_interval_s <= 3600),
            ("ORCH8_STALE_THRESHOLD_SECS", self.stale_threshold_s > self.heartbeat_interval_s),
            ("ORCH8_BATCH_SIZE", 1 <= self.batch_size <= 10_000),
            ("ORCH8_TICK_INTERVAL_MS", 1 <= self.tick_interval_ms <= 600_000),
            ("ORCH8_MAX_IN_FLIGHT", 1 <= self.max_in_flight <= 100_000),
            ("ORCH8_DRAIN_TIMEOUT_SECS", 0 <= self.drain_timeout_s <= 86_400),
            ("ORCH8_LOG_LEVEL", self.log_level in LOG_LEVELS),
            ("ORCH8_COMMIT_LINGER_MS", 0 <= self.commit_linger_ms <= 1000),
            ("ORCH8_COMMIT_MAX_BATCH", 1 <= self.commit_max_batch <= 10_000),
            ("ORCH8_WORKER_TIMEOUT_SECS", 2 <= self.worker_timeout_s <= 3600),
            ("ORCH8_API_POOL_SIZE", 1 <= self.api_pool_size <= 100),
            ("ORCH8_API_MAX_REQUESTS", 1 <= self.api_max_requests <= 100_000),
            ("ORCH8_API_BACKLOG", 1 <= self.api_backlog <= 65_535),
            ("ORCH8_API_READ_TIMEOUT_SECS", 0 < self.api_read_timeout_s <= 3600),
        ]
        for variable, ok in checks:
            if not ok:
                raise ConfigError(f"{variable}: value out of range")
        if self.api_token is not None and (not self.api_token.strip()
                                           or self.api_token != self.api_token.strip()):
            # A blank token would count as set (no loopback-only rule) yet match no client.
            raise ConfigError("ORCH8_API_TOKEN: must not be blank or begin or end with "
                              "whitespace")
        if self.batch_size > self.max_in_flight:
            # A worker never runs more than max_in_flight at once, so a larger batch could
            # never be claimed whole: refuse rather than cap it without saying so.
            raise ConfigError(
                f"ORCH8_BATCH_SIZE ({self.batch_size}) is larger than ORCH8_MAX_IN_FLIGHT "
                f"({self.max_in_flight}): raise ORCH8_MAX_IN_FLIGHT (--max-in-flight) to at "
                "least the batch size")
        if self.node_id is not None and not _is_node_id(self.node_id):
            raise ConfigError("ORCH8_NODE_ID: use 1-64 letters, digits, '-', '_' or '.'")
        return self

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced (command-line flags), validated again."""
        present = {k: v for k, v in overrides.items() if v is not None}
        if ("max_in_flight" in present and "batch_size" not in present
                and self.batch_size == Settings.batch_size):
            present["batch_size"] = _default_batch(present["max_in_flight"])
        return replace(self, **present).validated()

    def __repr__(self) -> str:
        # Never print secrets: the DSN may carry a password, the token is a credential.
        shown = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ("database_url", "api_token") and value:
                value = "<set>"
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _default_batch(max_in_flight: int) -> int:
    # The batch size's default follows a lower max in flight (a node set to run one step at
    # a time claims one at a time); a batch size that is given explicitly never does, and
    # one above the max in flight is refused.
    return min(Settings.batch_size, max_in_flight)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _seconds(raw: str) -> float:
    return _non_negative(raw, "seconds")


def _milliseconds(raw: str) -> float:
    return _non_negative(raw, "milliseconds")


def _non_negative(raw: str, unit: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a non-negative number of {unit}")
    return value


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _module_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _is_node_id(value: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return 1 <= len(value) <= 64 and set(value) <= allowed


def _text(raw: str) -> str:
    return raw


def _upper(raw: str) -> str:
    return raw.strip().upper()


# (environment variable, Settings field, parser)
FIELDS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("DATABASE_URL", "database_url", _text),
    ("ORCH8_NODE_ID", "node_id", _text),
    ("ORCH8_DATA_DIR", "data_dir", _text),
    ("ORCH8_WORKERS", "workers", _positive_int),
    ("ORCH8_HEARTBEAT_INTERVAL_SECS", "heartbeat_interval_s", _seconds),
    ("ORCH8_STALE_THRESHOLD_SECS", "stale_threshold_s", _seconds),
    ("ORCH8_BATCH_SIZE", "batch_size", _positive_int),
    ("ORCH8_TICK_INTERVAL_MS", "tick_interval_ms", _positive_int),
    ("ORCH8_MAX_IN_FLIGHT", "max_in_flight", _positive_int),
    ("ORCH8_HANDLERS", "handlers", _module_list),
    ("ORCH8_BIND", "bind", _text),
    ("ORCH8_DRAIN_TIMEOUT_SECS", "drain_timeout_s", _seconds),
    ("ORCH8_LOG_LEVEL", "log_level", _upper),
    ("ORCH8_API_TOKEN", "api_token", _text),
    ("ORCH8_INSECURE", "insecure", _boolean),
    ("ORCH8_COMMIT_LINGER_MS", "commit_linger_ms", _milliseconds),
    ("ORCH8_COMMIT_MAX_BATCH", "commit_max_batch", _positive_int),
    ("ORCH8_WORKER_TIMEOUT_SECS", "worker_timeout_s", _seconds),
    ("ORCH8_API_POOL_SIZE", "api_pool_size", _positive_int),
    ("ORCH8_API_MAX_REQUESTS", "api_max_requests", _positive_int),
    ("ORCH8_API_BACKLOG", "api_backlog", _positive_int),
    ("ORCH8_API_READ_TIMEOUT_SECS", "api_read_timeout_s", _seconds),
)

# Variables read elsewhere (the command-line client, the test suite), not by the node.
IGNORED_KEYS = frozenset({"ORCH8_URL", "ORCH8_TEST_DATABASE_URL"})
