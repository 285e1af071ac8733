"""A catalogue of corrupted warehouses: each stops the run at the named check, publishes
nothing, and leaves the previous night served (the same stage functions the DAG runs)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from pipeline import db, nightly, warehouse
from pipeline.config import Settings, use_case
from pipeline.errors import DataError, GateFailed
from tests.conftest import SCORE_DATE

UC = use_case("churn")
NIGHT = SCORE_DATE + timedelta(days=1)
LAST_DAY = NIGHT - timedelta(days=1)
TABLES = ("plans", *warehouse.TABLE_ORDER)

CATALOGUE = {
    "missing_column": (
        "ALTER TABLE {s}.tickets DROP COLUMN category",
        "column_exists on {s}.tickets.category",
    ),
    "renamed_column": (
        "ALTER TABLE {s}.usage_daily RENAME COLUMN minutes TO mins",
        "column_exists on {s}.usage_daily.minutes",
    ),
    "changed_type": (
        "ALTER TABLE {s}.usage_daily ALTER COLUMN data_mb TYPE text",
        "column_type on {s}.usage_daily.data_mb",
    ),
    "duplicate_customers": (
        "INSERT INTO {s}.customers SELECT * FROM {s}.customers WHERE customer_id <= 50",
        "unique_key on {s}.customers.customer_id",
    ),
    "day_without_usage": (
        f"DELETE FROM {{s}}.usage_daily WHERE usage_date = '{LAST_DAY}'",
        "fresh_through on {s}.usage_daily.usage_date",
    ),
    "fraction_of_volume": (
        f"DELETE FROM {{s}}.usage_daily WHERE usage_date = '{LAST_DAY}' AND customer_id % 10 <> 0",
        "daily_volume on {s}.usage_daily",
    ),
    "null_storm": (
        f"UPDATE {{s}}.usage_daily SET minutes = NULL WHERE usage_date >= '{NIGHT - timedelta(days=30)}' "
        "AND customer_id % 3 = 0",
        "null_fraction on {s}.usage_daily.minutes",
    ),
    "future_rows": (
        "INSERT INTO {s}.usage_daily SELECT customer_id, DATE '2099-01-01', minutes, data_mb, sessions "
        "FROM {s}.usage_daily LIMIT 10",
        "no_future_rows on {s}.usage_daily.usage_date",
    ),
    "negative_fees": (
        f"UPDATE {{s}}.invoices SET amount = -amount WHERE issue_date >= '{NIGHT - timedelta(days=10)}'",
        "value_rule on {s}.invoices",
    ),
    "empty_population": ("DELETE FROM {s}.customers", "empty population"),
    "population_halves": (
        "DELETE FROM {s}.customers WHERE customer_id % 2 = 0",
        "population_size on population",
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


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_corruption_stops_the_run_at_the_named_check(
    isolated: Settings, served: dict, case: str
) -> None:
    statement, named = CATALOGUE[case]
    bad = corrupted_copy(isolated, case, statement)
    try:
        with pytest.raises((GateFailed, DataError)) as err:
            nightly.run_night(bad, UC, NIGHT, retrain="never", run_id=f"catalogue-{case}")
        message = str(err.value)
        assert named.format(s=bad.warehouse_schema) in message, message
        assert "expected" in message or "empty population" in message
        # nothing published for the night; the previous night is still the one served
        assert (
            db.scalar(
                isolated.database_url,
                "SELECT count(*) FROM predictions.churn_scores WHERE score_date = %s",
                (NIGHT,),
            )
            == 0
        )
        latest = db.scalar(
            isolated.database_url,
            "SELECT json_build_array(min(score_date), count(*)) FROM predictions.churn_scores_latest",
        )
        assert latest == [SCORE_DATE.isoformat(), served["rows"]]
        run = db.scalar(
            isolated.database_url,
            "SELECT json_build_array(status, error) FROM ml.runs WHERE run_id = %s",
            (f"catalogue-{case}",),
        )
        assert run[0] == "failed" and run[1]
        if isinstance(err.value, GateFailed):
            stored = db.scalar(
                isolated.database_url,
                "SELECT count(*) FROM monitoring.checks WHERE run_id = %s AND NOT passed AND severity = 'fail'",
                (f"catalogue-{case}",),
            )
            assert stored >= 1
    finally:
        db.scalar(
            isolated.warehouse_url,
            f"DROP SCHEMA IF EXISTS {bad.warehouse_schema} CASCADE; SELECT 1",
        )


def test_a_clean_copy_passes_every_fail_check(isolated: Settings, served: dict) -> None:
    good = corrupted_copy(isolated, "clean", "SELECT 1")
    try:
        out = nightly.run_night(good, UC, NIGHT, retrain="never", run_id="catalogue-clean")
        assert out["published"]["rows"] > 0
        checks = db.scalar(
            isolated.database_url,
            "SELECT count(*) FROM monitoring.checks WHERE run_id = 'catalogue-clean'",
        )
        assert checks > 30
    finally:
        db.scalar(isolated.warehouse_url, "DROP SCHEMA IF EXISTS wh_clean CASCADE; SELECT 1")
