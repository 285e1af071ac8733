"""Point-in-time features: no leakage, the population contract, matured labels only."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import pyarrow.parquet as pq
import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import ConfigError, DataError
from pipeline.stages import features
from pipeline.store import db
from pipeline.synthetic import warehouse
from pipeline.synthetic.world import World
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")


def test_features_as_of_d_ignore_everything_appended_later(settings: Settings) -> None:
    """The leakage test: appending warehouse data after D leaves features as of D byte-identical."""
    s = replace(settings, warehouse_schema="wh_leak", home=settings.home / "leak")
    start = date(2024, 1, 1)
    as_of = start + timedelta(days=150)
    try:
        # the warehouse holds facts through D - 1, as on the night of D
        warehouse.seed(
            s, World(1500, start, seed=21, price_rise_day=120, launch_day=140), (as_of - start).days
        )
        before = features.build_snapshot(s, UC, as_of)
        # 60 more days arrive: usage, payments of old invoices, tickets, cancellations, sign-ups
        warehouse.advance(s, as_of + timedelta(days=59))
        assert (
            db.scalar(
                s.warehouse_url,
                "SELECT count(*) FROM wh_leak.payments WHERE payment_date >= %s",
                (as_of,),
            )
            > 0
        )
        after = features.build_snapshot(s, UC, as_of)
        assert after.sha256 == before.sha256
        assert after.path.read_bytes() == before.path.read_bytes()
        assert after.rows == before.rows > 1000
    finally:
        db.scalar(s.database_url, "DROP SCHEMA IF EXISTS wh_leak CASCADE; SELECT 1")


def test_snapshot_contract(seeded: Settings) -> None:
    snap = features.build_snapshot(seeded, UC, SCORE_DATE)
    table = pq.read_table(snap.path)
    ids = table.column("customer_id").to_numpy()
    assert len(set(ids)) == len(ids) == snap.rows
    # active as of D: signed up before D and not cancelled before D
    expected = db.scalar(
        seeded.warehouse_url,
        """SELECT count(*) FROM warehouse.customers c WHERE signup_date < %s
           AND NOT EXISTS (SELECT 1 FROM warehouse.cancellations x
                           WHERE x.customer_id = c.customer_id AND x.cancel_date < %s)""",
        (SCORE_DATE, SCORE_DATE),
    )
    assert snap.rows == expected
    for name in ("tenure_days", "minutes_30d", "late_payments_180d", "tickets_30d"):
        assert table.column(name).null_count == 0, name
    assert table.column("tenure_days").to_numpy().min() >= 1
    assert "label" not in table.column_names


def test_snapshot_is_content_addressed_and_verified(seeded: Settings) -> None:
    snap = features.build_snapshot(seeded, UC, SCORE_DATE)
    assert snap.path.name == f"{snap.sha256[:16]}.parquet"
    features.verify(snap)
    with pytest.raises(DataError, match="immutable"):
        features.verify(replace(snap, sha256="0" * 64))


def test_labels_only_once_matured(seeded: Settings) -> None:
    with pytest.raises(DataError, match="mature on"):
        features.build_snapshot(
            seeded, UC, SCORE_DATE - timedelta(days=10), labelled=True, known_through=SCORE_DATE
        )
    snap = features.build_snapshot(
        seeded, UC, SCORE_DATE - timedelta(days=30), labelled=True, known_through=SCORE_DATE
    )
    labels = pq.read_table(snap.path).column("label").to_numpy()
    positives = db.scalar(
        seeded.warehouse_url,
        """SELECT count(*) FROM warehouse.cancellations x JOIN warehouse.customers c USING (customer_id)
           WHERE x.cancel_date >= %s AND x.cancel_date < %s AND c.signup_date < %s""",
        (snap.as_of, SCORE_DATE, snap.as_of),
    )
    assert labels.sum() == positives > 0


def _with_sql(tmp_path, features_sql: str, labels_sql: str | None = None):
    (tmp_path / "features.sql").write_text(features_sql)
    changes: dict = {"sql": {"features": str(tmp_path / "features.sql")}}
    if labels_sql is not None:
        (tmp_path / "labels.sql").write_text(labels_sql)
        changes["sql"]["labels"] = str(tmp_path / "labels.sql")
    return UC.evolve(changes)


def test_numeric_columns_become_numbers_and_dates_are_refused_with_the_fix(
    seeded: Settings, tmp_path
) -> None:
    uc = _with_sql(
        tmp_path,
        "SELECT customer_id, CAST(monthly_fee AS numeric) AS fee, country "
        "FROM subscriptions JOIN customers USING (customer_id) "
        "WHERE valid_from < :as_of AND change_reason = 'signup';",
    )
    snap = features.build_snapshot(seeded, uc, SCORE_DATE)
    schema = pq.read_schema(snap.path)
    assert (
        str(schema.field("fee").type) == "double" and str(schema.field("country").type) == "string"
    )
    assert str(schema.field("customer_id").type) == "int64"  # integer keys widen to bigint
    dated = _with_sql(
        tmp_path, "SELECT customer_id, signup_date FROM customers WHERE signup_date < :as_of"
    )
    with pytest.raises(DataError, match=r"'signup_date'.*date32.*days_since_signup_date"):
        features.build_snapshot(seeded, dated, SCORE_DATE)


def test_labels_must_cover_the_population_once_each(seeded: Settings, tmp_path) -> None:
    twice = _with_sql(
        tmp_path,
        (UC.sql.features).read_text(),
        "SELECT customer_id, 0 AS label FROM customers WHERE signup_date < :as_of "
        "UNION ALL SELECT customer_id, 1 FROM customers WHERE customer_id = 1",
    )
    with pytest.raises(DataError, match=r"labels 1 customer_id more than once \(first: 1\)"):
        features.build_snapshot(seeded, twice, date(2024, 6, 1), labelled=True)
    missing = _with_sql(
        tmp_path,
        (UC.sql.features).read_text(),
        "SELECT customer_id, 0 AS label FROM customers WHERE signup_date < :as_of "
        "AND customer_id % 7 <> 0",
    )
    with pytest.raises(DataError, match="has no row for customer_id") as raised:
        features.build_snapshot(seeded, missing, date(2024, 6, 1), labelled=True)
    shown = str(raised.value).split("has no row for customer_id ")[1].split(" ")[0]
    assert int(shown) % 7 == 0  # one of the keys left out, as written (not np.int64(...))


def test_the_feature_session_takes_the_use_case_settings(
    settings: Settings,
) -> None:
    # churn's own (its BRIN date indexes); every other setting is the server's
    assert UC.warehouse.settings == {"random_page_cost": "1.1"}
    uc = UC.evolve(
        {"warehouse": {"session": {"jit": False, "work_mem": "64MB", "enable_nestloop": False}}}
    )
    assert uc.warehouse.settings == {
        "random_page_cost": "1.1",
        "jit": "off",
        "work_mem": "64MB",
        "enable_nestloop": "off",
    }
    conn = db.adbc_connect(settings.warehouse_url)
    try:
        cur = conn.cursor()
        db.apply_settings(cur, uc.warehouse.settings, "churn: warehouse.session")
        shown = {}
        for name in ("jit", "work_mem", "enable_nestloop"):
            cur.execute("SELECT current_setting($1)", parameters=(name,))
            shown[name] = cur.fetchone()[0]
        assert shown == {"jit": "off", "work_mem": "64MB", "enable_nestloop": "off"}
        with pytest.raises(ConfigError) as refused:
            db.apply_settings(cur, {"work_mem": "lots"}, "churn: warehouse.session")
        assert "churn: warehouse.session.work_mem: PostgreSQL refused 'lots'" in str(refused.value)
        cur.close()
    finally:
        conn.close()
    with pytest.raises(ConfigError, match="PostgreSQL setting names such as work_mem"):
        UC.evolve({"warehouse": {"session": {"work mem; DROP TABLE x": "1"}}})
