"""Settling a dead worker's claims, against the real SQL: charge what was running, release
the rest, apply each step's retry policy, fence everything."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from orch8 import Client
from supervisor.reaping import settle
from supervisor.running import RunningStep
from supervisor.slots import DeadWorker

INCARNATION = uuid.uuid4()

HOLD = """
UPDATE instances SET state = 'running', claimed_by = 'node-a', claim_incarnation = %(inc)s,
    claimed_slot = %(slot)s, claimed_at = now(), claim_epoch = claim_epoch + 1,
    attempt = %(attempt)s
WHERE id = %(id)s
"""


@pytest.fixture
def client(dsn: str) -> Any:
    with Client(dsn) as client:
        client.create_sequence("retried", [
            {"id": "a", "handler": "noop",
             "retry": {"max_attempts": 3, "initial_backoff_ms": 1000}},
            {"id": "b", "handler": "noop"}])
        client.create_sequence("plain", [{"id": "a", "handler": "noop"}])
        yield client


def held(conn: psycopg.Connection, client: Any, sequence: str, attempt: int = 0,
         slot: int = 1) -> uuid.UUID:
    instance_id = client.start(sequence).id
    conn.execute(HOLD, {"inc": INCARNATION, "slot": slot, "attempt": attempt,
                        "id": instance_id})
    return instance_id


def row(conn: psycopg.Connection, instance_id: uuid.UUID) -> dict[str, Any]:
    cursor = conn.execute(
        "SELECT state, attempt, last_error, claim_epoch, claimed_by, "
        "next_fire_at - now() AS wait, finished_at IS NOT NULL AS finished "
        "FROM instances WHERE id = %s", (instance_id,))
    names = [column.name for column in cursor.description or []]
    return dict(zip(names, cursor.fetchone() or (), strict=True))


def test_running_steps_are_charged_and_the_rest_released(conn: psycopg.Connection,
                                                         client: Any, dsn: str) -> None:
    retried = held(conn, client, "retried")
    exhausted = held(conn, client, "retried", attempt=2)
    no_policy = held(conn, client, "plain")
    not_started = held(conn, client, "retried")
    stale = held(conn, client, "retried", attempt=1)
    abandoned = held(conn, client, "retried")
    other_slot = held(conn, client, "retried", slot=2)
    epochs = {i: row(conn, i)["claim_epoch"] for i in (retried, not_started, other_slot)}
    running = (
        RunningStep(retried, "a", 1), RunningStep(exhausted, "a", 3),
        RunningStep(no_policy, "a", 1),
        # An older execution whose thread outlived its step: not the one the row is at.
        RunningStep(stale, "a", 1),
        RunningStep(abandoned, "a", 1, abandoned=True),
        RunningStep(other_slot, "a", 1),
    )
    settled = settle(dsn, DeadWorker(1, 4242, INCARNATION, "exited with code 1", running))

    assert (settled.retried, settled.failed, settled.released) == (1, 2, 3)
    error = "worker exited with code 1 while running step a"
    charged = row(conn, retried)
    assert (charged["state"], charged["attempt"], charged["last_error"]) == (
        "scheduled", 1, error)
    # Backoff from the retry policy (full jitter: half to all of 1000 ms), by the
    # database's clock.
    assert timedelta(milliseconds=400) < charged["wait"] <= timedelta(milliseconds=1000)
    assert charged["claim_epoch"] == epochs[retried] + 1 and charged["claimed_by"] is None
    for failed in (exhausted, no_policy):
        dead = row(conn, failed)
        assert (dead["state"], dead["last_error"], dead["finished"]) == ("failed", error, True)
    assert row(conn, exhausted)["attempt"] == 3 and row(conn, no_policy)["attempt"] == 1
    for released, attempt in ((not_started, 0), (stale, 1), (abandoned, 0)):
        back = row(conn, released)
        assert (back["state"], back["attempt"], back["last_error"]) == (
            "scheduled", attempt, None)
    assert row(conn, not_started)["claim_epoch"] == epochs[not_started] + 1
    untouched = row(conn, other_slot)
    assert (untouched["state"], untouched["claim_epoch"]) == ("running", epochs[other_slot])
    lines = sorted(line.rsplit(" in ", 1)[0] for line in settled.charged)
    assert lines == sorted([f"instance {retried}: {error}; retrying",
                            f"instance {exhausted}: {error}; failed (dead letter)",
                            f"instance {no_policy}: {error}; failed (dead letter)"])


def test_settling_twice_charges_once(conn: psycopg.Connection, client: Any, dsn: str) -> None:
    instance_id = held(conn, client, "retried")
    dead = DeadWorker(1, 4242, INCARNATION, "killed by SIGKILL",
                      (RunningStep(instance_id, "a", 1),))
    assert settle(dsn, dead).retried == 1
    assert settle(dsn, dead) == settle(dsn, dead)  # nothing held any more: a no-op
    assert row(conn, instance_id)["attempt"] == 1


def test_a_step_the_instance_moved_past_is_not_charged(conn: psycopg.Connection, client: Any,
                                                      dsn: str) -> None:
    instance_id = held(conn, client, "retried")
    conn.execute("UPDATE instances SET step_index = 1 WHERE id = %s", (instance_id,))
    dead = DeadWorker(1, 4242, INCARNATION, "killed by SIGKILL",
                      (RunningStep(instance_id, "a", 1),))
    settled = settle(dsn, dead)
    assert (settled.retried, settled.failed, settled.released) == (0, 0, 1)
    assert (row(conn, instance_id)["state"], row(conn, instance_id)["attempt"]) == (
        "scheduled", 0)


def test_a_step_run_in_a_held_claim_is_charged(conn: psycopg.Connection, client: Any,
                                               dsn: str) -> None:
    # A held claim leaves the row scheduled while its step runs (claims.LOCK_DUE): when
    # the process dies there, the row is as it was locked, at the step and attempt run.
    interrupted = client.start("retried").id
    moved_on = client.start("retried").id  # its attempt 1 already charged: not again
    conn.execute("UPDATE instances SET attempt = 1 WHERE id = %s", (moved_on,))
    epoch = row(conn, interrupted)["claim_epoch"]
    dead = DeadWorker(1, 4242, INCARNATION, "killed by SIGKILL",
                      (RunningStep(interrupted, "a", 1), RunningStep(moved_on, "a", 1)))
    settled = settle(dsn, dead)
    assert (settled.retried, settled.failed, settled.released) == (1, 0, 0)
    charged = row(conn, interrupted)
    assert (charged["state"], charged["attempt"], charged["last_error"]) == (
        "scheduled", 1, "worker killed by SIGKILL while running step a")
    assert charged["claim_epoch"] == epoch + 1 and charged["wait"] > timedelta(0)
    assert (row(conn, moved_on)["attempt"], row(conn, moved_on)["last_error"]) == (1, None)


def test_a_later_step_run_in_a_held_claim_is_charged_under_its_own_policy(
        conn: psycopg.Connection, client: Any, dsn: str) -> None:
    # A held claim ran step a, then died in step b: nothing of it was written, so the row
    # is still scheduled at step a, attempt 0. The charge lands on the row (its next run
    # is claimed, step by step), with step b's name and retry policy.
    client.create_sequence("chain", [{"id": "a", "handler": "noop"},
                                     {"id": "b", "handler": "noop",
                                      "retry": {"max_attempts": 2}}])
    retried, untouched = client.start("chain").id, client.start("chain").id
    conn.execute("UPDATE instances SET attempt = 1 WHERE id = %s", (untouched,))
    dead = DeadWorker(1, 4242, INCARNATION, "killed by SIGKILL", (
        RunningStep(retried, "b", 1),
        RunningStep(untouched, "b", 1),  # its row is at a retry: not from a held claim
    ))
    settled = settle(dsn, dead)
    assert (settled.retried, settled.failed, settled.released) == (1, 0, 0)
    charged = row(conn, retried)
    assert (charged["state"], charged["attempt"], charged["last_error"]) == (
        "scheduled", 1, "worker killed by SIGKILL while running step b")
    assert row(conn, untouched)["last_error"] is None
    # One step of its own policy (max_attempts 1): the dead letter at once.
    client.create_sequence("chain_strict", [{"id": "a", "handler": "noop",
                                             "retry": {"max_attempts": 3}},
                                            {"id": "b", "handler": "noop"}])
    strict = client.start("chain_strict").id
    dead = DeadWorker(1, 4243, INCARNATION, "killed by SIGKILL", (RunningStep(strict, "b", 1),))
    assert settle(dsn, dead).failed == 1
    assert row(conn, strict)["last_error"] == "worker killed by SIGKILL while running step b"
