"""Point-in-time features: no leakage, the population contract, matured labels only."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import pyarrow.parquet as pq
import pytest

from pipeline import db, features, usecase, warehouse
from pipeline.config import Settings
from pipeline.errors import DataError
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
            s, 1500, start, (as_of - start).days, seed=21, price_rise_day=120, launch_day=140
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
