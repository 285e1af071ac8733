"""The synthetic warehouse: deterministic per seed, resumable, with behaviour-driven churn and drift."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import pytest

from pipeline.conf.config import Settings
from pipeline.core.errors import ConfigError
from pipeline.store import db
from pipeline.synthetic import simulation, warehouse
from pipeline.synthetic.world import World
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
        warehouse.seed(
            a, World(600, date(2024, 1, 1), seed=5, price_rise_day=20, launch_day=30), 50
        )
        warehouse.advance(a, date(2024, 1, 1) + timedelta(days=79))
        warehouse.seed(
            b, World(600, date(2024, 1, 1), seed=5, price_rise_day=20, launch_day=30), 80
        )
        for table in TABLES:
            assert table_digest(a, table) == table_digest(b, table), table
        assert warehouse.data_through(a) == date(2024, 3, 20)
    finally:
        for s in (a, b):
            db.scalar(
                s.database_url, f"DROP SCHEMA IF EXISTS {s.warehouse_schema} CASCADE; SELECT 1"
            )


def test_another_seed_gives_another_warehouse(fresh_schema: Settings, seeded: Settings) -> None:
    warehouse.seed(fresh_schema, World(WAREHOUSE_CUSTOMERS, WAREHOUSE_START, seed=12), 30)
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


def test_an_email_changes_its_customer_only_and_the_truth_is_hidden(settings: Settings) -> None:
    """Sends from a campaign's send log reach the simulated customers sent them and no one
    else; the world without those sends is what the simulator records as counterfactual."""
    import psycopg2

    start, send_day = date(2024, 1, 1), date(2024, 2, 25)
    mailed = replace(settings, warehouse_schema="wh_mail_a")
    unmailed = replace(settings, warehouse_schema="wh_mail_b")
    log = "campaigns.simtest_send_log"
    try:
        for s in (mailed, unmailed):
            warehouse.seed(s, World(600, start, seed=5, price_rise_day=20, launch_day=30), 50)
        conn = db.connect(settings.database_url, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("CREATE SCHEMA IF NOT EXISTS campaigns")
            cur.execute(f"CREATE TABLE {log} (customer_id integer, score_date date, status text)")
            cur.execute(
                f"INSERT INTO {log} SELECT customer_id, %s, 'sent' FROM wh_mail_a.customers c "
                "WHERE NOT EXISTS (SELECT 1 FROM wh_mail_a.cancellations x "
                "WHERE x.customer_id = c.customer_id) ORDER BY customer_id LIMIT 300",
                (send_day,),
            )
            # a failed send reached no one
            cur.execute(f"INSERT INTO {log} VALUES (599, %s, 'failed')", (send_day,))
        warehouse.advance(mailed, start + timedelta(days=79))
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE {log}")
        warehouse.advance(unmailed, start + timedelta(days=79))

        sent = "(SELECT customer_id FROM wh_mail_a_truth.exposures)"
        for table, columns in {
            "usage_daily": "t.*",
            "cancellations": "t.*",
            "tickets": "t.customer_id, t.opened_date, t.category",
            "invoices": "t.customer_id, t.issue_date, t.amount",
            "payments": "t.customer_id, t.payment_date, t.amount",
        }.items():
            digests = [
                db.scalar(
                    settings.database_url,
                    f"SELECT md5(string_agg(r, '|' ORDER BY r)) FROM (SELECT ({columns})::text r "
                    f"FROM {s.warehouse_schema}.{table} t WHERE t.customer_id NOT IN {sent}) q",
                )
                for s in (mailed, unmailed)
            ]
            assert digests[0] == digests[1], f"{table} changed for customers not sent an email"

        truth = db.read_arrow(
            settings.database_url,
            "SELECT e.customer_id, e.effect, e.counterfactual_cancel_date AS cf, "
            "a.cancel_date AS mailed, b.cancel_date AS unmailed "
            "FROM wh_mail_a_truth.exposures e "
            "LEFT JOIN wh_mail_a.cancellations a USING (customer_id) "
            "LEFT JOIN wh_mail_b.cancellations b USING (customer_id)",
        ).to_pylist()
        assert 250 <= len(truth) <= 300  # the failed send and the already gone are not there
        assert {r["customer_id"] for r in truth}.isdisjoint({599})
        effects = {round(r["effect"], 3) for r in truth}
        assert effects <= {
            0.0,
            simulation.PERSUADED,
            simulation.SLEEPING_DOG,
            round(simulation.PERSUADED + simulation.SLEEPING_DOG, 3),
        }
        assert len(effects) >= 2, effects  # heterogeneous
        for r in truth:
            if r["effect"] <= 0:
                # the same luck while they are active: without the email they would have
                # done exactly what the world that never sent it shows
                assert r["cf"] == r["unmailed"], r
            if r["effect"] == 0:
                assert r["mailed"] == r["unmailed"], r
        n_active = db.scalar(
            settings.database_url,
            "SELECT count(*) FROM wh_mail_a_truth.effects WHERE as_of = %s",
            (send_day,),
        )
        assert n_active > 400

        for role in ("nightscore_writer", "nightscore_reader", "nightscore_campaign"):
            with conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute(f"SET ROLE {role}; SELECT * FROM wh_mail_a_truth.exposures")
            with conn.cursor() as cur:
                cur.execute("RESET ROLE")
        conn.close()
    finally:
        conn = db.connect(settings.database_url, autocommit=True)
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {log}")
            for name in ("wh_mail_a", "wh_mail_b", "wh_mail_a_truth", "wh_mail_b_truth"):
                cur.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        conn.close()
