"""churn_campaign through Airflow: scheduled on the churn_scores asset, sends through the
nightscore_smtp connection to a real SMTP sink, once per person, with no address in any
log or XCom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.faces import airflow_env as af
from pipeline.run import nightly
from pipeline.store import db
from tests.conftest import SCORE_DATE
from tests.smtp_sink import smtp_sink

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


@pytest.mark.slow
def test_dags_test_sends_each_person_one_message_and_a_rerun_sends_none(
    isolated: Settings, airflow_env: dict[str, str]
) -> None:
    uc = usecase.load("churn")
    nightly.run_night(isolated, uc, SCORE_DATE, retrain="always", run_id="campaign-dag")
    day = SCORE_DATE.isoformat()
    with smtp_sink() as sink:
        env = airflow_env | af.airflow_env(isolated)
        env |= {
            "NIGHTSCORE_DATABASE_URL": isolated.database_url,
            "NIGHTSCORE_WAREHOUSE_URL": isolated.warehouse_url,
            "AIRFLOW_CONN_NIGHTSCORE_SMTP": json.dumps(
                {"conn_type": "smtp", "host": "127.0.0.1", "port": sink.port}
            ),
        }
        conf = json.dumps({"dry_run": False, "score_date": day})
        runs = []
        for _ in range(2):  # the same date twice: the second run emails no one
            result = subprocess.run(
                [AIRFLOW, "dags", "test", "churn_campaign", day, "--conf", conf],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
            runs.append(result.stdout + result.stderr)
            if len(runs) == 1:
                after_first = Counter(sink.recipients())
    emails = db.scalar(
        isolated.database_url,
        "SELECT array_agg(email) FROM campaigns.retention_audience WHERE score_date = %s",
        (SCORE_DATE,),
    )
    received = Counter(sink.recipients())
    assert received == after_first  # the re-run sent nothing
    assert set(received) == set(emails) and max(received.values()) == 1
    assert all("@example.com" not in output for output in runs)  # task logs
    xcoms = db.scalar(
        os.environ["NIGHTSCORE_AIRFLOW_DATABASE_URL"],  # Airflow's metadata (airflow_env)
        "SELECT coalesce(string_agg(x.value::text, ' '), '') FROM xcom x "
        "WHERE x.dag_id = 'churn_campaign'",
    )
    assert "send_emails" in runs[0] and '"sent"' in xcoms and "@" not in xcoms
    exports = isolated.home / "exports" / "churn" / day
    assert (exports / "retention_audience.csv").exists()
    assert (exports / "retention_audience.parquet").exists()
