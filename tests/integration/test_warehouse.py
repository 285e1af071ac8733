"""The synthetic warehouse: deterministic per seed, resumable, with behaviour-driven churn and drift."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import pytest

from pipeline import db, warehouse
from pipeline.config import Settings
from pipeline.errors import ConfigError
from tests.conftest import SCORE_DATE, WAREHOUSE_CUSTOMERS, WAREHOUSE_START

TABLES = warehouse.TABLE_ORDER


def table_digest(settings: Settings, table: str) -> str:
    return db.scalar(
        settings.warehouse_url,
        f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {settings.warehouse_schema}.{table} t",
    )


def test_same_seed_same_warehouse_and_advance_equals_longer_seed(settings: Settings) -> None:
    a = replace(settings, warehouse_schema="wh_det_a")
    b = replace(settings, warehouse_schema="wh_det_b")
    try:
        warehouse.seed(a, 600, date(2024, 1, 1), 50, seed=5, price_rise_day=20, launch_day=30)
        warehouse.advance(a, date(2024, 1, 1) + timedelta(days=79))
        warehouse.seed(b, 600, date(2024, 1, 1), 80, seed=5, price_rise_day=20, launch_day=30)
        for table in TABLES:
            assert table_digest(a, table) == table_digest(b, table), table
        assert warehouse.data_through(a) == date(2024, 3, 20)
    finally:
        for s in (a, b):
            db.scalar(
                s.database_url, f"DROP SCHEMA IF EXISTS {s.warehouse_schema} CASCADE; SELECT 1"
            )


def test_another_seed_gives_another_warehouse(fresh_schema: Settings, seeded: Settings) -> None:
    warehouse.seed(fresh_schema, WAREHOUSE_CUSTOMERS, WAREHOUSE_START, 30, seed=12)
    assert table_digest(fresh_schema, "customers") != table_digest(seeded, "customers")


def test_advance_refuses_to_go_backwards(seeded: Settings) -> None:
    with pytest.raises(ConfigError, match="already holds facts through"):
        warehouse.advance(seeded, WAREHOUSE_START)


def test_facts_are_never_dated_after_the_last_simulated_day(seeded: Settings) -> None:
    through = warehouse.data_through(seeded)
    for table, col in [
        ("usage_daily", "usage_date"),
        ("payments", "payment_date"),
        ("invoices", "issue_date"),
        ("tickets", "opened_date"),
        ("cancellations", "cancel_date"),
        ("customers", "signup_date"),
    ]:
        latest = db.scalar(seeded.warehouse_url, f"SELECT max({col}) FROM warehouse.{table}")
        assert latest <= through, table


def test_churn_is_driven_by_observable_behaviour(seeded: Settings) -> None:
    """Customers whose usage fell cancel far more often in the next 30 days."""
    q = """
    WITH u AS (
        SELECT customer_id,
               sum(minutes) FILTER (WHERE usage_date >= %(d)s::date - 30) AS recent,
               sum(minutes) FILTER (WHERE usage_date <  %(d)s::date - 30) AS before
        FROM warehouse.usage_daily WHERE usage_date >= %(d)s::date - 60 AND usage_date < %(d)s
        GROUP BY customer_id
    )
    SELECT avg((x.customer_id IS NOT NULL)::int) FILTER (WHERE u.recent < 0.5 * u.before),
           avg((x.customer_id IS NOT NULL)::int) FILTER (WHERE u.recent >= 0.9 * u.before)
    FROM u LEFT JOIN warehouse.cancellations x
      ON x.customer_id = u.customer_id AND x.cancel_date >= %(d)s AND x.cancel_date < %(d)s::date + 30
    """
    conn = db.connect(seeded.warehouse_url)
    with conn.cursor() as cur:
        cur.execute(q, {"d": SCORE_DATE - timedelta(days=40)})
        falling, steady = cur.fetchone()
    conn.close()
    assert falling > 3 * steady


def test_price_rise_drift_event_raises_german_churn(seeded: Settings) -> None:
    """The drift event: German cancellations jump after the price rise, other countries do not."""
    rise = WAREHOUSE_START + timedelta(days=240)
    q = """
    SELECT c.country = 'DE' AS de,
           count(*) FILTER (WHERE x.cancel_date >= %(r)s::date - 45 AND x.cancel_date < %(r)s) AS before,
           count(*) FILTER (WHERE x.cancel_date >= %(r)s AND x.cancel_date < %(r)s::date + 45) AS after
    FROM warehouse.cancellations x JOIN warehouse.customers c USING (customer_id)
    GROUP BY 1 ORDER BY 1
    """
    conn = db.connect(seeded.warehouse_url)
    with conn.cursor() as cur:
        cur.execute(q, {"r": rise})
        (_, other_before, other_after), (_, de_before, de_after) = cur.fetchall()
    conn.close()
    assert de_after > 1.5 * de_before
    assert other_after < 1.3 * other_before
