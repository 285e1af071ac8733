"""A catalogue of corrupted warehouses, each run through the DAG (``dag.test``, what
``airflow dags test`` runs): the run stops at the named check with a message a user can
act on, publishes nothing, and leaves the previous night served in ``*_latest``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.faces import airflow_env as af
from pipeline.run import nightly
from pipeline.store import db
from pipeline.synthetic import warehouse
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")
NIGHT = SCORE_DATE + timedelta(days=1)
LAST_DAY = NIGHT - timedelta(days=1)
TABLES = ("plans", *warehouse.TABLE_ORDER)
RUNNER = Path(__file__).with_name("dag_catalogue.py")

# case: (the corruption, the check its message names, the task that stops the run)
CATALOGUE = {
    "missing_column": (
        "ALTER TABLE {s}.tickets DROP COLUMN category",
        "column_exists on {s}.tickets.category",
        "check_sources",
    ),
    "renamed_column": (
        "ALTER TABLE {s}.usage_daily RENAME COLUMN minutes TO mins",
        "column_exists on {s}.usage_daily.minutes",
        "check_sources",
    ),
    "changed_type": (
        "ALTER TABLE {s}.usage_daily ALTER COLUMN data_mb TYPE text",
        "column_type on {s}.usage_daily.data_mb",
        "check_sources",
    ),
    "duplicate_customers": (
        "INSERT INTO {s}.customers SELECT * FROM {s}.customers WHERE customer_id <= 50",
        "unique_key on {s}.customers.customer_id",
        "check_sources",
    ),
    "day_without_usage": (
        f"DELETE FROM {{s}}.usage_daily WHERE usage_date = '{LAST_DAY}'",
        "fresh_through on {s}.usage_daily.usage_date",
        "check_sources",
    ),
    "fraction_of_volume": (
        f"DELETE FROM {{s}}.usage_daily WHERE usage_date = '{LAST_DAY}' AND customer_id % 10 <> 0",
        "daily_volume on {s}.usage_daily",
        "check_sources",
    ),
    "null_storm": (
        f"UPDATE {{s}}.usage_daily SET minutes = NULL WHERE usage_date >= '{NIGHT - timedelta(days=30)}' "
        "AND customer_id % 3 = 0",
        "null_fraction on {s}.usage_daily.minutes",
        "check_sources",
    ),
    "future_rows": (
        "INSERT INTO {s}.usage_daily SELECT customer_id, DATE '2099-01-01', minutes, data_mb, sessions "
        "FROM {s}.usage_daily LIMIT 10",
        "no_future_rows on {s}.usage_daily.usage_date",
        "check_sources",
    ),
    "negative_fees": (
        f"UPDATE {{s}}.invoices SET amount = -amount WHERE issue_date >= '{NIGHT - timedelta(days=10)}'",
        "value_rule on {s}.invoices",
        "check_sources",
    ),
    "nan_amounts": (
        f"UPDATE {{s}}.invoices SET amount = 'NaN' WHERE issue_date >= '{NIGHT - timedelta(days=10)}'",
        "finite on {s}.invoices.amount",
        "check_sources",
    ),
    "infinite_fees": (  # the column widened (numeric(10,2) cannot hold infinity): same type
        "ALTER TABLE {s}.subscriptions ALTER COLUMN monthly_fee TYPE numeric; "
        f"UPDATE {{s}}.subscriptions SET monthly_fee = 'Infinity' "
        f"WHERE valid_from >= '{NIGHT - timedelta(days=20)}'",
        "finite on {s}.subscriptions.monthly_fee",
        "check_sources",
    ),
    "invoices_loaded_twice": (
        f"INSERT INTO {{s}}.invoices SELECT * FROM {{s}}.invoices "
        f"WHERE issue_date >= '{NIGHT - timedelta(days=60)}' AND issue_date < '{NIGHT - timedelta(days=30)}'",
        "unique_key on {s}.invoices.invoice_id",
        "check_sources",
    ),
    "null_keys_in_usage": (  # 0.8% of the rows: under the 1% null limit of other columns
        f"UPDATE {{s}}.usage_daily SET customer_id = NULL "
        f"WHERE usage_date >= '{NIGHT - timedelta(days=30)}' AND customer_id % 125 = 0",
        "null_fraction on {s}.usage_daily.customer_id",
        "check_sources",
    ),
    "cancelled_before_signup": (
        "UPDATE {s}.cancellations x SET cancel_date = c.signup_date - 3 FROM {s}.customers c "
        "WHERE c.customer_id = x.customer_id AND x.customer_id % 4 = 0",
        "cross_rule on {s}.cancellations x {s}.customers: cancelled_after_signup",
        "check_sources",
    ),
    "week_shifted_a_day": (  # a time zone bug: the last day is intact
        f"UPDATE {{s}}.usage_daily SET usage_date = usage_date + 1 "
        f"WHERE usage_date >= '{NIGHT - timedelta(days=14)}' "
        f"AND usage_date < '{NIGHT - timedelta(days=7)}'",
        "days_complete on {s}.usage_daily.usage_date",
        "check_sources",
    ),
    "backdated_cancellations": (  # corrections into days an earlier night already scored
        f"INSERT INTO {{s}}.cancellations SELECT c.customer_id, DATE '{NIGHT - timedelta(days=10)}', "
        "'other' FROM {s}.customers c WHERE c.customer_id % 20 = 0 AND NOT EXISTS ("
        "SELECT 1 FROM {s}.cancellations x WHERE x.customer_id = c.customer_id)",
        "history_unchanged on {s}.cancellations",
        "check_sources",
    ),
    # deleting customers orphans the new day's facts (the first checks the message lists)
    # and rewrites the days an earlier night counted (history_unchanged)
    "empty_population": (
        "DELETE FROM {s}.customers",
        "references on {s}.usage_daily.customer_id",
        "check_sources",
    ),
    "population_halves": (
        "DELETE FROM {s}.customers WHERE customer_id % 2 = 0",
        "references on {s}.usage_daily.customer_id",
        "check_sources",
    ),
    "usage_of_unknown_customers": (  # 2% of the new day's facts keyed to no customer
        f"UPDATE {{s}}.usage_daily SET customer_id = customer_id + 1000000 "
        f"WHERE usage_date = '{LAST_DAY}' AND customer_id % 50 = 0",
        "references on {s}.usage_daily.customer_id",
        "check_sources",
    ),
    "last_day_loaded_twice": (  # 2.0 x the usual rows: inside the old 0.5..2.0 bounds
        f"INSERT INTO {{s}}.usage_daily SELECT * FROM {{s}}.usage_daily "
        f"WHERE usage_date = '{LAST_DAY}'",
        "daily_volume on {s}.usage_daily",
        "check_sources",
    ),
    "country_respelled": (  # every value lower-cased: 100% of rows unseen in training
        "UPDATE {s}.customers SET country = lower(country)",
        "unseen_categories on country",
        "check_features",
    ),
    # restated in place 40 days back, the rows per day unchanged: outside the 30 days the
    # value rules read, inside the 60 the usage windows sum. The kept windows (summed the
    # night before from the clean facts) see the content changed and are rebuilt from the
    # facts, whose month before goes negative.
    "negative_minutes_restated": (
        f"UPDATE {{s}}.usage_daily SET minutes = -5000 "
        f"WHERE usage_date = '{NIGHT - timedelta(days=40)}' AND customer_id % 4 = 0",
        "range on minutes_prev_30d",
        "check_features",
    ),
}


# case: (the corruption, the warning it must record while the night still publishes)
WARNINGS = {
    "unseen_country": (  # 1% of customers in a market training never saw: PSI stays low
        "UPDATE {s}.customers SET country = 'BR' WHERE customer_id % 100 = 0",
        "unseen_categories on country",
    ),
    # values restated in place 40 days back (rows per day unchanged), inside what the
    # features read (the usage table's lookback_days: 61), plausible values
    "sessions_restated_40_days_back": (
        f"UPDATE {{s}}.usage_daily SET sessions = sessions + 1 "
        f"WHERE usage_date = '{NIGHT - timedelta(days=40)}' AND customer_id % 4 = 0",
        "history_unchanged on {s}.usage_daily",
    ),
}


@pytest.fixture(scope="module")
def served(isolated: Settings) -> dict:
    out = nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="catalogue-base")
    return {"rows": out["published"]["rows"], "version": out["model_version"]}


def corrupted_copy(settings: Settings, name: str, statement: str) -> Settings:
    schema = f"wh_{name}"
    parts = [f"DROP SCHEMA IF EXISTS {schema} CASCADE", f"CREATE SCHEMA {schema}"]
    parts += [f"CREATE TABLE {schema}.{t} AS TABLE warehouse.{t}" for t in TABLES]
    parts += [statement.format(s=schema).replace("%", "%%"), "SELECT 1"]  # no bound parameters
    db.scalar(settings.warehouse_url, "; ".join(parts))
    return replace(settings, warehouse_schema=schema)


@pytest.fixture(scope="module")
def outcomes(
    isolated: Settings, served: dict, airflow_env: dict[str, str], tmp_path_factory
) -> dict[str, dict]:
    """Every case, then a clean copy, through ``churn_nightly`` for NIGHT in one Airflow process."""
    work = tmp_path_factory.mktemp("dag_catalogue")
    cases = [
        {"case": case, "schema": corrupted_copy(isolated, case, statement).warehouse_schema}
        for case, (statement, _, _) in sorted(CATALOGUE.items())
    ]
    cases += [  # these publish: after every case that must not
        {
            "case": case,
            "schema": corrupted_copy(isolated, case, statement).warehouse_schema,
            "conf": {"retrain": "never"},
        }
        for case, (statement, _) in sorted(WARNINGS.items())
    ]
    clean = corrupted_copy(isolated, "clean", "SELECT 1")
    cases.append({"case": "clean", "schema": clean.warehouse_schema, "conf": {"retrain": "never"}})
    (work / "spec.json").write_text(json.dumps({"night": NIGHT.isoformat(), "cases": cases}))
    env = airflow_env | af.airflow_env(isolated)
    env |= {
        "NIGHTSCORE_DATABASE_URL": isolated.database_url,
        "NIGHTSCORE_WAREHOUSE_URL": isolated.warehouse_url,
    }
    try:
        result = subprocess.run(
            [sys.executable, str(RUNNER), str(work / "spec.json"), str(work / "out.jsonl")],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        (work / "airflow.log").write_text(result.stdout + result.stderr)
        lines = (
            (work / "out.jsonl").read_text().splitlines() if (work / "out.jsonl").exists() else []
        )
        found = {o["case"]: o for o in map(json.loads, lines)}
        assert len(found) == len(cases), (
            f"the runner stopped after {len(found)} of {len(cases)} cases (exit "
            f"{result.returncode}); see {work / 'airflow.log'}:\n{result.stderr[-3000:]}"
        )
        return found
    finally:
        drops = [f"DROP SCHEMA IF EXISTS {c['schema']} CASCADE" for c in cases]
        db.scalar(isolated.warehouse_url, "; ".join([*drops, "SELECT 1"]))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_corruption_stops_the_dag_at_the_named_check(
    outcomes: dict[str, dict], served: dict, case: str
) -> None:
    _, named, stopping_task = CATALOGUE[case]
    out = outcomes[case]
    schema = f"wh_{case}"
    message = out["run"]["error"] or ""
    assert out["dag_run_state"] == "failed"
    assert out["run"]["status"] == "failed"
    assert named.format(s=schema) in message, message
    assert "expected" in message
    # the run stopped at that task: it failed (once, no retries), nothing after it ran
    assert out["tasks"][stopping_task] == "failed", out["tasks"]
    for later in ("train_challenger", "select_model", "publish_scores", "score_shadow"):
        assert out["tasks"].get(later) in ("upstream_failed", "skipped", None), out["tasks"]
    if stopping_task == "check_sources":
        assert "build_features" not in out["run"]["stages"]  # stopped before featurizing
    if stopping_task.startswith("check_"):
        failed = [c for c in out["checks"] if not c["passed"] and c["severity"] == "fail"]
        assert failed, out["checks"]
    # nothing published for the night; the previous night is still the one served
    assert out["published"] == 0
    assert out["latest"] == [SCORE_DATE.isoformat(), served["rows"]]


@pytest.mark.slow
def test_a_clean_copy_passes_every_check_and_publishes(outcomes: dict[str, dict]) -> None:
    out = outcomes["clean"]
    assert out["dag_run_state"] == "success", out["tasks"]
    assert out["run"]["status"] == "published"
    assert out["published"] > 3000
    assert out["latest"] == [NIGHT.isoformat(), out["published"]]
    assert len(out["checks"]) > 30
    assert all(c["passed"] for c in out["checks"] if c["severity"] == "fail")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(WARNINGS))
def test_a_warning_is_recorded_and_the_night_still_publishes(
    outcomes: dict[str, dict], case: str
) -> None:
    _, named = WARNINGS[case]
    out = outcomes[case]
    assert out["dag_run_state"] == "success", out["tasks"]
    assert out["published"] > 3000
    warned = [
        f"{c['check']} on {c['target']}"
        for c in out["checks"]
        if not c["passed"] and c["severity"] == "warn"
    ]
    assert named.format(s=f"wh_{case}") in warned, out["checks"]
