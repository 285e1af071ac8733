"""Two use cases on two warehouses in one Airflow, each through ``airflow dags test``.

``churn`` reads the telco warehouse; ``accounts`` (``tests/data/usecases/accounts/``)
reads a CRM warehouse nightscore never generated, in a database of its own: text
account keys, a ``timestamptz`` event table, a naive-timestamp plan table, a region
dimension with no date. Adding it took files under ``tests/data/usecases/`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest

from pipeline.conf.config import Settings
from pipeline.faces import airflow_env as af
from pipeline.store import db
from tests.conftest import SCORE_DATE, create_database, drop_database
from tests.data import accounts_warehouse
from tests.smtp_sink import smtp_sink

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START = date(2024, 1, 1)
DAYS = 240
NIGHT = START + timedelta(days=DAYS)  # the warehouse holds facts through the day before


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def crm(server_url: str, session_id: str) -> Iterator[str]:
    """The CRM warehouse, in its own database."""
    name = f"nightscore_test_{session_id}_crm"
    url = create_database(server_url, name)
    accounts_warehouse.seed(url, START, DAYS)
    yield url
    drop_database(server_url, name)


@pytest.fixture(scope="module")
def env(isolated: Settings, crm: str, airflow_env: dict[str, str]) -> dict[str, str]:
    """One Airflow with both use cases: churn's warehouse is ``nightscore_warehouse``, the
    CRM is the ``accounts_dwh`` connection the accounts config names."""
    out = airflow_env | af.airflow_env(isolated)
    out |= {
        "NIGHTSCORE_USECASES": os.pathsep.join(
            [str(REPO / "usecases"), str(REPO / "tests" / "data" / "usecases")]
        ),
        "NIGHTSCORE_DATABASE_URL": isolated.database_url,
        "NIGHTSCORE_WAREHOUSE_URL": isolated.warehouse_url,
        "AIRFLOW_CONN_ACCOUNTS_DWH": af.connection_json(crm),
    }
    out.pop("ACCOUNTS_DWH_URL", None)
    return out


@pytest.fixture(scope="module")
def nights(env: dict[str, str], crm: str, isolated: Settings) -> dict[str, str]:
    """``db init``, then a night of each use case through Airflow, one after the other."""
    init = run(env, "nightscore", "db", "init")
    check = run(
        env | {"ACCOUNTS_DWH_URL": crm},
        "nightscore",
        "usecase",
        "check",
        "accounts",
        "--date",
        NIGHT.isoformat(),
    )
    accounts = run(env, "airflow", "dags", "test", "accounts_nightly", NIGHT.isoformat())
    # a date no other DAG test runs churn_nightly for (a backfill skips dates that have runs)
    churn_night = SCORE_DATE + timedelta(days=6)
    churn = run(env, "airflow", "dags", "test", "churn_nightly", churn_night.isoformat())
    return {
        "init": init.stdout,
        "check": check.stdout,
        "accounts": accounts.stdout + accounts.stderr,
        "churn": churn.stdout + churn.stderr,
    }


def ledger(settings: Settings, use_case: str) -> dict:
    return db.scalar(
        settings.database_url,
        "SELECT json_build_object('status', status, 'rows', rows_published, 'score_date', "
        "score_date, 'run_id', run_id, 'stages', stages) FROM ml.runs WHERE use_case = %s "
        "AND run_id LIKE 'manual__%%' ORDER BY started_at DESC LIMIT 1",
        (use_case,),
    )


@pytest.mark.slow
def test_db_init_generates_each_use_case_serving_objects(nights: dict[str, str]) -> None:
    for name in (
        "predictions.account_close_scores",
        "predictions.account_close_scores_latest",
        "predictions.account_close_scores_shadow",
        "campaigns.account_rescue_audience",
        "predictions.churn_scores_history",
        "predictions.late_payment_scores",
    ):
        assert name in nights["init"]


@pytest.mark.slow
def test_usecase_check_passes_every_item_on_the_crm_warehouse(nights: dict[str, str]) -> None:
    lines = nights["check"].splitlines()
    items = {line.split()[1] for line in lines if line.startswith("  ok")}
    assert {"warehouse", "contract", "history", "features", "labels", "campaign"} <= items
    assert not [line for line in lines if line.startswith("  FAIL")]
    assert "schema crm" in nights["check"] and "ready:" in lines[-1]


@pytest.mark.slow
def test_both_nights_publish_each_from_its_own_warehouse(
    nights: dict[str, str], isolated: Settings, crm: str
) -> None:
    accounts, churn = ledger(isolated, "accounts"), ledger(isolated, "churn")
    assert accounts["status"] == "published" and accounts["score_date"] == NIGHT.isoformat()
    assert churn["status"] == "published"
    served = db.scalar(
        isolated.database_url,
        "SELECT json_build_object('rows', count(*), 'keys', array_agg(account_ref ORDER BY "
        "account_ref), 'type', pg_typeof(min(account_ref))::text) "
        "FROM predictions.account_close_scores_latest",
    )
    assert served["rows"] == accounts["rows"] > 1000
    assert served["type"] == "text" and all(k.startswith("ACC-") for k in served["keys"])
    # the population is the CRM's: accounts opened before the night (New York time)
    # and not cancelled before it
    expected = db.scalar(
        crm,
        "SELECT array_agg(a.account_ref::text ORDER BY a.account_ref::text) FROM crm.accounts a "
        "WHERE a.opened_at < TIMESTAMP %s AT TIME ZONE 'America/New_York' AND NOT EXISTS ("
        "SELECT 1 FROM crm.plan_changes c WHERE c.account_ref = a.account_ref "
        "AND c.status = 'cancelled' AND c.changed_at < TIMESTAMP %s)",
        (NIGHT.isoformat(), NIGHT.isoformat()),
    )
    assert sorted(served["keys"]) == sorted(expected)
    churn_rows = db.scalar(
        isolated.database_url, "SELECT count(*) FROM predictions.churn_scores_latest"
    )
    assert churn_rows == churn["rows"] > 3000
    # three scoring tasks for accounts (its config), two for churn
    assert {k for k in accounts["stages"] if k.startswith("score_partition_")} == {
        "score_partition_0",
        "score_partition_1",
        "score_partition_2",
    }


@pytest.mark.slow
def test_source_checks_handle_timestamptz_days_and_a_dimension_without_dates(
    nights: dict[str, str], isolated: Settings
) -> None:
    run_id = ledger(isolated, "accounts")["run_id"]
    checks = db.scalar(
        isolated.database_url,
        "SELECT json_agg(json_build_object('check', check_name, 'target', target, 'passed', "
        "passed)) FROM monitoring.checks WHERE use_case = 'accounts' AND run_id = %s "
        "AND stage = 'sources'",
        (run_id,),
    )
    by_target = {(c["check"], c["target"]): c["passed"] for c in checks}
    assert by_target[("fresh_through", "crm.activity.happened_at")] is True
    assert by_target[("daily_volume", f"crm.activity on {NIGHT - timedelta(days=1)}")] is True
    assert by_target[("unique_key", "crm.regions.region_code")] is True
    assert not [t for (check, t) in by_target if t.startswith("crm.regions") and check in (
        "fresh_through", "no_future_rows", "daily_volume")]  # fmt: skip
    assert all(by_target.values())


@pytest.mark.slow
def test_the_campaign_of_a_text_keyed_use_case_emails_each_account_once_with_its_own_log(
    nights: dict[str, str], env: dict[str, str], isolated: Settings
) -> None:
    conf = json.dumps({"dry_run": False, "score_date": NIGHT.isoformat()})
    with smtp_sink() as sink:
        smtp = json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": sink.port})
        run(
            env | {"AIRFLOW_CONN_NIGHTSCORE_SMTP": smtp},
            "airflow",
            "dags",
            "test",
            "accounts_campaign",
            NIGHT.isoformat(),
            "--conf",
            conf,
        )
    audience = db.scalar(
        isolated.database_url,
        "SELECT json_agg(json_build_array(account_ref, email, reasons)) "
        "FROM campaigns.account_rescue_audience WHERE score_date = %s",
        (NIGHT,),
    )
    assert 0 < len(audience) <= 40  # the campaign's capacity
    received = Counter(sink.recipients())
    assert set(received) == {email for _, email, _ in audience}
    assert set(received.values()) == {1}
    sent = db.scalar(
        isolated.database_url,
        "SELECT count(*) FROM campaigns.account_rescue_send_log WHERE status = 'sent' "
        "AND account_ref LIKE 'ACC-%%'",
    )
    assert sent == len(audience)
    control = db.scalar(
        isolated.database_url,
        "SELECT count(*) FROM predictions.account_close_scores_latest s "
        "JOIN campaigns.account_rescue_audience a USING (account_ref) WHERE s.control_group",
    )
    assert control == 0  # the permanent control group is never contacted
