"""Bad input gets an error that names what is wrong and what to do."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import DataError, SourceError
from pipeline.stages import features
from pipeline.store import db
from pipeline.synthetic import warehouse
from pipeline.synthetic.world import World

UC = usecase.load("churn")


def test_unreachable_warehouse_names_the_host_not_the_password(settings: Settings) -> None:
    bad = replace(settings, warehouse_url="postgresql://nightscore:topsecret@127.0.0.1:1/nowhere")
    with pytest.raises(SourceError, match=r"127\.0\.0\.1:1") as err:
        features.build_snapshot(bad, UC, date(2024, 6, 1))
    assert "topsecret" not in str(err.value)
    assert "check that the server is running" in str(err.value)


def test_missing_source_table_is_named(fresh_schema: Settings) -> None:
    db.scalar(fresh_schema.database_url, f"CREATE SCHEMA {fresh_schema.warehouse_schema}; SELECT 1")
    with pytest.raises(SourceError, match="source table 'usage_daily' not found") as err:
        features.build_snapshot(fresh_schema, UC, date(2024, 6, 1))
    assert fresh_schema.warehouse_schema in str(err.value)
    assert "windows.usage_windows" in str(err.value)  # what reads it
    other = usecase.load("late_payment")  # no windows: the feature query's own error
    with pytest.raises(SourceError, match=r"source table '\w+' not found in schema"):
        features.build_snapshot(fresh_schema, other, date(2024, 6, 1))


def test_missing_source_column_is_named(fresh_schema: Settings) -> None:
    warehouse.seed(fresh_schema, World(300, date(2024, 1, 1), seed=3), 40)
    db.scalar(
        fresh_schema.database_url,
        f"ALTER TABLE {fresh_schema.warehouse_schema}.tickets RENAME COLUMN category TO kind; SELECT 1",
    )
    with pytest.raises(SourceError, match="category"):
        features.build_snapshot(fresh_schema, UC, date(2024, 2, 1))


def test_empty_population_is_refused(seeded: Settings) -> None:
    with pytest.raises(DataError, match="empty population"):
        features.build_snapshot(seeded, UC, date(2000, 1, 1))
