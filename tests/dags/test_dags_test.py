"""End to end through Airflow itself: ``airflow dags test churn_nightly <date>`` on a small warehouse."""

from __future__ import annotations

import email
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.store import db
from pipeline.synthetic.demo import local_mailbox
from tests.conftest import SCORE_DATE

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def dags_test(env: dict[str, str], dag_id: str, day, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AIRFLOW, "dags", "test", dag_id, day.isoformat(), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_churn_nightly_runs_end_to_end_and_publishes(
    seeded: Settings, airflow_env: dict[str, str]
) -> None:
    day = SCORE_DATE + timedelta(days=1)
    result = dags_test(airflow_env, "churn_nightly", day)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    conn = db.connect(seeded.database_url)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT status, rows_published, model_version, stages FROM ml.runs "
            "WHERE score_date = %s AND run_id LIKE 'manual__%%' ORDER BY started_at DESC LIMIT 1",
            (day,),
        )
        status, rows, version, stages = cur.fetchone()
        cur.execute(
            "SELECT count(*), min(model_version) FROM predictions.churn_scores WHERE score_date = %s",
            (day,),
        )
        served, served_version = cur.fetchone()
    conn.close()
    assert status == "published"
    assert served == rows > 3000
    assert served_version == version
    assert {
        "build_features",
        "train_challenger",
        "evaluate_challenger",
        "select_model",
        "score_partition_0",
        "score_partition_1",
        "publish_scores",
    } <= set(stages)


@pytest.mark.slow
def test_retrain_never_skips_training_and_scores_with_the_champion(
    seeded: Settings, airflow_env: dict[str, str]
) -> None:
    day = SCORE_DATE + timedelta(days=2)
    result = dags_test(airflow_env, "churn_nightly", day, "--conf", '{"retrain": "never"}')
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    stages = db.scalar(
        seeded.database_url,
        "SELECT stages FROM ml.runs WHERE score_date = %s ORDER BY started_at DESC LIMIT 1",
        (day,),
    )
    assert "train_challenger" not in stages and stages["publish_scores"]["status"] == "ok"


@pytest.mark.slow
def test_a_task_failing_after_the_swap_fails_the_run_and_the_night_stays_served(
    seeded: Settings, airflow_env: dict[str, str], tmp_path: Path
) -> None:
    day = SCORE_DATE + timedelta(days=3)
    env = airflow_env | {"NIGHTSCORE_FAULT_RAISE": "score_shadow"}
    with local_mailbox(tmp_path) as smtp_env:
        dags_test(env | smtp_env, "churn_nightly", day, "--conf", '{"retrain": "never"}')
    run = db.scalar(
        seeded.database_url,
        "SELECT json_build_object('run_id', run_id, 'status', status, 'error', error, 'rows', "
        "rows_published, 'stages', stages) FROM ml.runs WHERE score_date = %s "
        "ORDER BY started_at DESC LIMIT 1",
        (day,),
    )
    assert run["status"] == "failed" and "fault injected at score_shadow" in run["error"]
    assert run["stages"]["publish_scores"]["status"] == "ok"
    assert run["stages"]["write_report"]["status"] == "ok"  # the report is still written
    latest = db.scalar(
        seeded.database_url,
        "SELECT json_build_array(min(score_date), count(*)) FROM predictions.churn_scores_latest",
    )
    assert latest == [day.isoformat(), run["rows"]]
    assert (
        db.scalar(
            seeded.database_url,
            "SELECT run_id FROM ml.publications WHERE use_case = 'churn' AND score_date = %s",
            (day,),
        )
        == run["run_id"]
    )
    # the failed night told the use case's alerts, once: the stage, its error, what is served
    (mail,) = [email.message_from_bytes(p.read_bytes()) for p in tmp_path.glob("*.eml")]
    assert mail["Subject"] == f"[nightscore] churn: the night of {day} failed"
    assert mail["To"] == ", ".join(usecase.load("churn").alerts.to)
    text = "".join(
        part.get_payload(decode=True).decode()
        for part in mail.walk()
        if part.get_content_maintype() == "text"
    )
    assert "failed at score_shadow: fault injected at score_shadow" in text
    assert f"Its scores were published before the failure ({run['rows']:,} rows)" in text
    assert f"holds the night of {day}" in text
    assert f"nightscore/runs/churn_nightly/{quote(run['run_id'], safe='')}" in text
