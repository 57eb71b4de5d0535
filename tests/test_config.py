"""Settings from the environment: defaults, parsing, and one-line errors."""

from __future__ import annotations

import pytest

from orch8.config import Settings
from orch8.database import redact
from orch8.errors import ConfigError


def test_defaults_match_the_documented_ones():
    settings = Settings.from_environ({})
    assert (settings.heartbeat_interval_s, settings.stale_threshold_s) == (10.0, 60.0)
    assert (settings.batch_size, settings.tick_interval_ms) == (100, 100)
    assert settings.database_url is None and settings.bind == "127.0.0.1:8080"


def test_values_are_parsed_with_units():
    settings = Settings.from_environ({
        "ORCH8_HEARTBEAT_INTERVAL_SECS": "1", "ORCH8_STALE_THRESHOLD_SECS": "3.5",
        "ORCH8_BATCH_SIZE": "7", "ORCH8_HANDLERS": "a.b, c", "ORCH8_NODE_ID": "node-1",
        "ORCH8_INSECURE": "yes"})
    assert settings.heartbeat_interval_s == 1.0 and settings.stale_threshold_s == 3.5
    assert settings.batch_size == 7 and settings.handlers == ("a.b", "c")
    assert settings.node_id == "node-1" and settings.insecure is True


def test_the_api_limits_are_settings():
    settings = Settings.from_environ({
        "ORCH8_API_POOL_SIZE": "6", "ORCH8_API_MAX_REQUESTS": "100",
        "ORCH8_API_BACKLOG": "4096", "ORCH8_API_READ_TIMEOUT_SECS": "2.5",
        "ORCH8_COMMIT_LINGER_MS": "2.5"})
    assert (settings.api_pool_size, settings.api_max_requests) == (6, 100)
    assert (settings.api_backlog, settings.api_read_timeout_s) == (4096, 2.5)
    assert settings.commit_linger_ms == 2.5


@pytest.mark.parametrize("environ, named", [
    ({"ORCH8_BATCH_SIZ": "5"}, "unknown environment variable ORCH8_BATCH_SIZ"),
    ({"ORCH8_BATCH_SIZE": "lots"}, "ORCH8_BATCH_SIZE"),
    ({"ORCH8_BATCH_SIZE": "0"}, "ORCH8_BATCH_SIZE"),
    ({"ORCH8_TICK_INTERVAL_MS": "-1"}, "ORCH8_TICK_INTERVAL_MS"),
    ({"ORCH8_HEARTBEAT_INTERVAL_SECS": "nan"}, "ORCH8_HEARTBEAT_INTERVAL_SECS"),
    ({"ORCH8_HEARTBEAT_INTERVAL_SECS": "10", "ORCH8_STALE_THRESHOLD_SECS": "5"},
     "ORCH8_STALE_THRESHOLD_SECS"),
    ({"ORCH8_NODE_ID": "has space"}, "ORCH8_NODE_ID"),
    ({"ORCH8_INSECURE": "maybe"}, "ORCH8_INSECURE"),
    ({"ORCH8_LOG_LEVEL": "chatty"}, "ORCH8_LOG_LEVEL"),
    ({"ORCH8_WORKERS": "0"}, "ORCH8_WORKERS: must be a positive integer"),
    ({"ORCH8_API_TOKEN": "   "}, "ORCH8_API_TOKEN: must not be blank"),
    ({"ORCH8_API_TOKEN": " secret"}, "ORCH8_API_TOKEN"),
    ({"ORCH8_COMMIT_LINGER_MS": "-1"}, "ORCH8_COMMIT_LINGER_MS: .* milliseconds"),
    ({"ORCH8_API_MAX_REQUESTS": "0"}, "ORCH8_API_MAX_REQUESTS"),
    ({"ORCH8_API_POOL_SIZE": "101"}, "ORCH8_API_POOL_SIZE"),
    ({"ORCH8_API_READ_TIMEOUT_SECS": "0"}, "ORCH8_API_READ_TIMEOUT_SECS"),
    ({"ORCH8_BATCH_SIZE": "500", "ORCH8_MAX_IN_FLIGHT": "100"},
     r"ORCH8_BATCH_SIZE \(500\) is larger than ORCH8_MAX_IN_FLIGHT \(100\)"),
])
def test_bad_values_name_the_variable(environ, named):
    with pytest.raises(ConfigError, match=named):
        Settings.from_environ(environ)


def test_a_batch_as_large_as_in_flight_is_honoured():
    settings = Settings.from_environ({"ORCH8_BATCH_SIZE": "500", "ORCH8_MAX_IN_FLIGHT": "500"})
    assert (settings.batch_size, settings.max_in_flight) == (500, 500)


def test_the_max_in_flight_flag_overrides_the_environment():
    from supervisor.main import settings_from

    settings = settings_from(["--batch-size", "400", "--max-in-flight", "800"],
                             {"ORCH8_MAX_IN_FLIGHT": "100"})
    assert (settings.batch_size, settings.max_in_flight) == (400, 800)


def test_secrets_never_show_in_the_settings_repr():
    settings = Settings.from_environ({"DATABASE_URL": "postgresql://u:hunter2@db/x",
                                      "ORCH8_API_TOKEN": "s3cret"})
    assert "hunter2" not in repr(settings) and "s3cret" not in repr(settings)


@pytest.mark.parametrize("text", [
    "postgresql://orch8:hunter2@db.internal:5432/orch8",
    "host=db user=orch8 password=hunter2 dbname=orch8",
    "connection failed: host=db password='hunter2' user=x",
])
def test_redact_hides_dsn_passwords(text):
    assert "hunter2" not in redact(text)
    assert "***" in redact(text)


def test_the_default_batch_follows_a_lower_max_in_flight():
    assert Settings.from_environ({"ORCH8_MAX_IN_FLIGHT": "1"}).batch_size == 1
    assert Settings.from_environ({"ORCH8_MAX_IN_FLIGHT": "500"}).batch_size == 100
    assert Settings.from_environ({}).with_overrides(max_in_flight=3).batch_size == 3
    with pytest.raises(ConfigError, match="ORCH8_BATCH_SIZE"):
        Settings.from_environ({"ORCH8_BATCH_SIZE": "50", "ORCH8_MAX_IN_FLIGHT": "1"})
