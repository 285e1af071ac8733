"""Killing a send mid-way: the re-run emails the remainder only, nobody twice."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from pipeline.campaigns.audience import build_audience
from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.run import nightly
from pipeline.store import db
from tests.conftest import SCORE_DATE
from tests.faults.conftest import kill, spawn
from tests.smtp_sink import Sink, smtp_sink

UC = usecase.load("churn")


@pytest.fixture(scope="module")
def audience(isolated: Settings) -> list[str]:
    nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="send-faults")
    build_audience(isolated, UC, SCORE_DATE)
    return db.scalar(
        isolated.database_url,
        "SELECT array_agg(email ORDER BY audience_rank) FROM campaigns.retention_audience "
        "WHERE score_date = %s",
        (SCORE_DATE,),
    )


@pytest.fixture
def clean_log(isolated: Settings):
    db.scalar(isolated.database_url, "DELETE FROM campaigns.retention_send_log; SELECT 1")
    yield
    db.scalar(isolated.database_url, "DELETE FROM campaigns.retention_send_log; SELECT 1")


def send_in_child(
    settings: Settings, sink: Sink, run_id: str, pause: str | None, tmp: Path
) -> subprocess.Popen:
    """Start a send in a child process; with ``pause``, wait until it stops there."""
    args = {
        "database_url": settings.database_url,
        "home": str(settings.home),
        "score_date": SCORE_DATE.isoformat(),
        "run_id": run_id,
        "smtp_port": sink.port,
    }
    return spawn("tests.faults.sender", args, pause, tmp / f"{run_id}.paused")


def statuses(settings: Settings) -> dict[str, int]:
    return (
        db.scalar(
            settings.database_url,
            "SELECT json_object_agg(status, n) FROM (SELECT status, count(*) AS n "
            "FROM campaigns.retention_send_log GROUP BY status) s",
        )
        or {}
    )


def test_killed_between_messages_the_rerun_sends_the_remainder_only(
    isolated: Settings, audience: list[str], clean_log: None, tmp_path: Path
) -> None:
    with smtp_sink() as sink:
        proc = send_in_child(isolated, sink, "killed", "campaign_sent:25", tmp_path)
        output = kill(proc)
        assert len(sink.recipients()) == 25 and statuses(isolated) == {"sent": 25}
        rerun = send_in_child(isolated, sink, "rerun", None, tmp_path)
        assert rerun.wait(300) == 0, rerun.stdout.read()
        out = json.loads(rerun.stdout.read().strip().splitlines()[-1])
    received = Counter(sink.recipients())
    assert set(received) == set(audience) and max(received.values()) == 1
    assert out["sent"] == len(audience) - 25 and out["already_sent"] == 25
    assert statuses(isolated) == {"sent": len(audience)}
    assert "@" not in output


def test_killed_after_claiming_that_one_message_is_never_sent_twice(
    isolated: Settings, audience: list[str], clean_log: None, tmp_path: Path
) -> None:
    """Killed between the claim and the SMTP call: the message may or may not have left,
    so the claimed customer is reported as unconfirmed and never retried."""
    with smtp_sink() as sink:
        kill(send_in_child(isolated, sink, "claimed", "campaign_claimed", tmp_path))
        assert statuses(isolated) == {"sending": 1} and not sink.received
        rerun = send_in_child(isolated, sink, "rerun-2", None, tmp_path)
        assert rerun.wait(300) == 0, rerun.stdout.read()
        out = json.loads(rerun.stdout.read().strip().splitlines()[-1])
    received = Counter(sink.recipients())
    assert max(received.values()) == 1 and set(received) == set(audience[1:])
    assert len(out["unconfirmed"]) == 1 and out["sent"] == len(audience) - 1
    assert statuses(isolated) == {"sent": len(audience) - 1, "sending": 1}
