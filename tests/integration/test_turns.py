"""One night of a use case at a time (``pipeline.store.turns``), on a real PostgreSQL."""

from __future__ import annotations

import logging

import psycopg2
import pytest

from pipeline.conf.config import Settings
from pipeline.conf.urls import with_role
from pipeline.store import turns


def test_a_second_run_waits_for_the_first_and_follows_it(isolated: Settings) -> None:
    everyone = lambda run_id: True  # noqa: E731
    assert turns.take(isolated, "turn_case", "run-a", everyone) is None
    assert turns.take(isolated, "turn_case", "run-a", everyone) is None  # a retry keeps it
    why = turns.take(isolated, "turn_case", "run-b", everyone)
    assert why is not None and "waiting for run run-a of turn_case" in why
    assert not turns.give_back(isolated, "turn_case", "run-b")  # not its turn to give
    assert turns.give_back(isolated, "turn_case", "run-a")
    assert turns.take(isolated, "turn_case", "run-b", everyone) is None
    turns.give_back(isolated, "turn_case", "run-b")


def test_a_run_that_died_holding_the_turn_loses_it(
    isolated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert turns.take(isolated, "dead_case", "run-killed", lambda r: True) is None
    caplog.set_level(logging.WARNING, logger="pipeline.store.turns")
    assert turns.take(isolated, "dead_case", "run-next", lambda r: r != "run-killed") is None
    assert any("took the turn of run run-killed" in r.getMessage() for r in caplog.records)
    turns.give_back(isolated, "dead_case", "run-next")


def test_a_reader_cannot_hold_a_turn(isolated: Settings) -> None:
    turns.take(isolated, "read_case", "run-x", lambda r: True)
    reader = psycopg2.connect(with_role(isolated.init_url, "nightscore_reader"))
    try:
        with reader.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("SELECT 1 FROM ml.night_turns WHERE use_case = 'read_case' FOR UPDATE")
    finally:
        reader.close()
    turns.give_back(isolated, "read_case", "run-x")
