"""Alerts against the ledger in PostgreSQL, sent through Airflow's SMTP notifier to a local
SMTP sink: what a person on call receives."""

from __future__ import annotations

import email
from collections.abc import Iterator
from datetime import UTC, date, datetime
from email.message import Message
from pathlib import Path

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import DataError
from pipeline.run import alerts
from pipeline.store import ledger, serving
from pipeline.store.ledger import RunContext
from pipeline.synthetic import demo
from tests.conftest import create_database, drop_database

UC = usecase.load("churn").evolve({"alerts": {"to": ["oncall@example.com"]}})
NIGHT = date(2026, 12, 5)
SERVED = date(2026, 12, 4)
REPORT = "http://127.0.0.1:8080/nightscore/runs/churn_nightly/scheduled__2026-12-05"


@pytest.fixture(scope="module")
def serving_db(
    server_url: str, session_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    name = f"nightscore_test_{session_id}_alerts"
    url = create_database(server_url, name)
    serving.init(url, usecase.load_all())
    settings = Settings(database_url=url, warehouse_url=url, home=tmp_path_factory.mktemp("alerts"))
    ledger.db_exec(
        settings,
        "INSERT INTO ml.publications (use_case, score_date, run_id, model_version, rows) "
        "VALUES ('churn', %s, 'scheduled__served', 'churn-20261204-abc', 41000)",
        (SERVED,),
    )
    yield settings
    drop_database(server_url, name)


def failed_night(settings: Settings, run_id: str) -> RunContext:
    run = RunContext("churn", NIGHT, run_id)
    ledger.start(settings, run)
    with ledger.stage(settings, run, "start_run"):
        pass
    with pytest.raises(DataError), ledger.stage(settings, run, "check_sources"):
        raise DataError("warehouse.usage_daily.customer_id: 3 orphans (first: 1761)")
    return run


def received(folder: Path) -> list[Message]:
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(folder.glob("*.eml"))]


def body(message: Message) -> str:
    parts = message.walk() if message.is_multipart() else [message]
    return "".join(
        p.get_payload(decode=True).decode() for p in parts if p.get_content_maintype() == "text"
    )


def test_a_failed_night_sends_one_email_naming_the_stage_the_error_what_is_served_and_the_report(
    serving_db: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = failed_night(serving_db, "scheduled__failed")
    alert = alerts.failed(serving_db, UC, NIGHT, run.run_id, "check_sources", REPORT)
    with demo.local_mailbox(tmp_path) as smtp_env:
        for key, value in smtp_env.items():
            monkeypatch.setenv(key, value)
        assert alerts.send(UC, alert, "nightscore_smtp")
    (message,) = received(tmp_path)
    assert message["Subject"] == "[nightscore] churn: the night of 2026-12-05 failed"
    assert message["To"] == "oncall@example.com"
    text = body(message)
    assert "failed at check_sources: warehouse.usage_daily.customer_id: 3 orphans" in text
    assert "check_sources: check_sources" not in text
    assert "holds the night of 2026-12-04 (model churn-20261204-abc" in text
    assert f'href="{REPORT}"' in text and "Done: start_run" in text


def test_a_late_night_alerts_until_its_date_is_published(serving_db: Settings) -> None:
    run = RunContext("churn", NIGHT, "scheduled__late")
    ledger.start(serving_db, run)
    with ledger.stage(serving_db, run, "start_run"):
        pass
    deadline = datetime(2026, 12, 5, 6, tzinfo=UTC)
    alert = alerts.late(serving_db, UC, NIGHT, run.run_id, deadline, REPORT)
    assert alert is not None
    assert "not published by its deadline (2026-12-05 06:00 UTC" in alert.text
    assert "it is running" in alert.text and "Not done: check_sources" in alert.text
    ledger.db_exec(
        serving_db,
        "INSERT INTO ml.publications (use_case, score_date, run_id, model_version, rows) "
        "VALUES ('churn', %s, %s, 'churn-20261204-abc', 41000)",
        (NIGHT, run.run_id),
    )
    try:
        assert alerts.late(serving_db, UC, NIGHT, run.run_id, deadline, REPORT) is None
    finally:
        ledger.db_exec(
            serving_db,
            "DELETE FROM ml.publications WHERE use_case = 'churn' AND score_date = %s",
            (NIGHT,),
        )


def test_with_nobody_to_tell_nothing_is_sent_and_the_log_says_what_to_set(
    serving_db: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    run = failed_night(serving_db, "scheduled__nobody")
    uc = UC.evolve({"alerts": {"to": []}})
    alert = alerts.failed(serving_db, uc, NIGHT, run.run_id, None, REPORT)
    assert not alerts.send(uc, alert, "nightscore_smtp")
    assert "set alerts.to" in caplog.text
