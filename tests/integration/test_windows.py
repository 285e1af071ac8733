"""Windows kept night to night (``pipeline.stages.windows``) give the snapshots a rebuild from the
facts gives, and are not used once the warehouse no longer counts their days the same."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import ConfigError, DataError
from pipeline.stages import features, windows
from pipeline.store import db
from pipeline.synthetic import warehouse
from pipeline.synthetic.world import World

UC = usecase.load("churn")
START = date(2024, 1, 1)
FIRST = START + timedelta(days=100)
SCHEMA = "wh_windows"


@pytest.fixture(scope="module")
def wh(settings: Settings) -> Iterator[Settings]:
    s = replace(settings, warehouse_schema=SCHEMA, home=settings.home / "windows")
    warehouse.seed(s, World(1200, START, seed=5, price_rise_day=80), (FIRST - START).days + 6)
    yield s
    db.scalar(s.database_url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; SELECT 1")


def _from_facts(s: Settings, tag: str) -> Settings:
    """The same warehouse with an empty state store: windows rebuilt from the facts."""
    return replace(s, home=s.home.parent / f"windows_{tag}")


def _usage_of_its_own(s: Settings, schema: str, table: str = "usage_daily") -> None:
    """``schema``: a copy of ``table`` that a test may restate, views of the rest."""
    others = [t for t in warehouse.TABLE_ORDER if t != table]
    db.scalar(
        s.database_url,
        f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.{table} AS "
        f"SELECT * FROM {SCHEMA}.{table}; "
        + "; ".join(f"CREATE VIEW {schema}.{t} AS SELECT * FROM {SCHEMA}.{t}" for t in others)
        + "; SELECT 1",
    )


def _how(caplog: pytest.LogCaptureFixture, block: str = "usage_windows") -> list[str]:
    """How each snapshot made ``block``, in order (the windows module's log)."""
    return [
        r.getMessage().rsplit(": ", 1)[-1]
        for r in caplog.records
        if r.getMessage().startswith("windows ") and f": {block}: " in r.getMessage()
    ]


def test_kept_windows_give_the_snapshots_of_a_rebuild(
    wh: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
    nights = [FIRST + timedelta(days=i) for i in range(5)]
    kept = [features.build_snapshot(wh, UC, d) for d in nights]
    for block in ("usage_windows", "plan_state", "billing_state"):  # windows and states
        assert _how(caplog, block) == ["facts"] + ["rolled 1 day(s)"] * 4, block
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert _kept(wh, "usage_windows", nights[-1]) == _kept_from_facts(
        wh, "usage_windows", nights[-1]
    )
    for night, snap in zip(nights, kept, strict=True):
        rebuilt = features.build_snapshot(_from_facts(wh, str(night)), UC, night)
        assert rebuilt.sha256 == snap.sha256, night
        assert rebuilt.path.read_bytes() == snap.path.read_bytes()
    # and the query with the windows as CTEs over the facts (no temporary table, no state)
    inline = db.read_arrow(
        wh.warehouse_url,
        features.query(UC, "features"),
        {"as_of": nights[-1]},
        schema=wh.warehouse_schema,
    )
    snap = pq.read_table(kept[-1].path)
    for column in ("minutes_7d", "minutes_prev_30d", "active_days_30d", "days_since_last_usage"):
        assert inline.column(column).to_pylist() == snap.column(column).to_pylist(), column
    assert sum(v > 0 for v in snap.column("minutes_prev_30d").to_pylist()) > 1000


def test_a_gap_of_nights_rolls_several_days_and_a_rerun_reads_the_kept_state(
    wh: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    s = _from_facts(wh, "gap")
    caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
    features.build_snapshot(s, UC, FIRST)
    later = features.build_snapshot(s, UC, FIRST + timedelta(days=3))
    again = features.build_snapshot(s, UC, FIRST + timedelta(days=3))
    assert _how(caplog) == ["facts", "rolled 3 day(s)", "stored"]
    assert again.sha256 == later.sha256
    fresh = features.build_snapshot(_from_facts(wh, "gap_fresh"), UC, FIRST + timedelta(days=3))
    assert fresh.sha256 == later.sha256
    # the kept rows themselves, entities outside the population and leaving ones included
    first, rolled = (_kept(s, "usage_windows", d) for d in (FIRST, FIRST + timedelta(days=3)))
    assert rolled == _kept_from_facts(s, "usage_windows", FIRST + timedelta(days=3))
    assert set(first["customer_id"]) - set(rolled["customer_id"]), "no entity left the windows"
    assert None in rolled["last_usage_date"] or len(set(rolled["last_usage_date"])) > 1


def _kept(s: Settings, block: str, day: date) -> dict[str, list]:
    """The rows of ``block`` the state store keeps as of ``day``."""
    b = next(b for b in windows.blocks(UC) if b.name == block)
    (path,) = (windows._folder(s, UC, b) / f"as_of={day}").glob("*.parquet")
    return pq.read_table(path).to_pydict()


def _kept_from_facts(s: Settings, block: str, day: date) -> dict[str, list]:
    b = next(b for b in windows.blocks(UC) if b.name == block)
    return db.read_arrow(
        s.warehouse_url,
        f"SELECT * FROM ({b.facts}) AS f ORDER BY customer_id",
        {"as_of": day},
        schema=s.warehouse_schema,
    ).to_pydict()


def test_a_past_day_that_changed_rebuilds_the_windows_from_the_facts(
    wh: Settings, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    s = replace(wh, warehouse_schema="wh_windows_late", home=wh.home.parent / "windows_late")
    day = FIRST + timedelta(days=2)
    try:
        _usage_of_its_own(s, "wh_windows_late")
        features.build_snapshot(s, UC, day - timedelta(days=1))
        # a late fact for a day the kept windows already counted (another customer's day)
        db.scalar(
            s.database_url,
            "INSERT INTO wh_windows_late.usage_daily "
            "SELECT customer_id, usage_date - 5, 999, 999, 1 FROM wh_windows_late.usage_daily "
            "WHERE usage_date = %s - 1 AND customer_id NOT IN (SELECT customer_id FROM "
            "wh_windows_late.usage_daily WHERE usage_date = %s - 6) LIMIT 1; SELECT 1",
            (day, day),
        )
        caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
        after = features.build_snapshot(s, UC, day)
        assert _how(caplog)[-1] == "facts"
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("usage_daily changed since the kept state was built" in m for m in warned)
        assert any(f"{day - timedelta(days=6)}: " in m and " rows" in m for m in warned)
        fresh = features.build_snapshot(_from_facts(s, "late_fresh"), UC, day)
        assert after.sha256 == fresh.sha256
    finally:
        db.scalar(settings.database_url, "DROP SCHEMA IF EXISTS wh_windows_late CASCADE; SELECT 1")


def test_windows_refuse_a_sum_that_is_not_an_integer_and_a_date_that_is_not_a_date(
    wh: Settings,
) -> None:
    fees = UC.evolve(
        {
            "windows": {
                "fees": {
                    "table": "subscriptions",
                    "date": "valid_from",
                    "aggregates": {"fee_30d": {"sum": "monthly_fee", "days": 30}},
                }
            }
        }
    )
    with pytest.raises(
        DataError,
        match=r"windows\.fees .*wh_windows\.subscriptions\.monthly_fee should be bigint or "
        r"integer or smallint, found numeric",
    ):
        features.build_snapshot(wh, fees, FIRST)
    text = {
        "table": "subscriptions",
        "date": "change_reason",
        "aggregates": {"n": {"count": "*", "days": 7}},
    }
    dated = UC.evolve({"windows": {"fees": text}})
    with pytest.raises(
        DataError, match=r"wh_windows\.subscriptions\.change_reason should be date, found text"
    ):
        features.build_snapshot(wh, dated, FIRST)


def test_a_window_aggregate_names_exactly_one_kind() -> None:
    with pytest.raises(ConfigError, match="exactly one of sum"):
        UC.evolve(
            {
                "windows": {
                    "usage_windows": {
                        "aggregates": {"x": {"sum": "minutes", "count": "*", "days": 7}}
                    }
                }
            }
        )
    with pytest.raises(ConfigError, match="last: takes the window's date column"):
        UC.evolve(
            {
                "windows": {
                    "usage_windows": {"aggregates": {"x": {"last": "signup_date", "days": 7}}}
                }
            }
        )


def test_a_read_only_warehouse_gets_the_windows_from_the_facts(
    wh: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A hot standby refuses even temporary tables: the windows are CTEs, nothing kept."""
    url = wh.warehouse_url
    url += ("&" if "?" in url else "?") + "options=-c%20default_transaction_read_only%3Don"
    s = replace(_from_facts(wh, "read_only"), warehouse_url=url)
    caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
    snap = features.build_snapshot(s, UC, FIRST + timedelta(days=1))
    assert "the warehouse is read-only" in caplog.text
    assert not (s.snapshots / UC.name / "windows").exists()
    kept = features.build_snapshot(_from_facts(wh, "read_write"), UC, FIRST + timedelta(days=1))
    assert snap.sha256 == kept.sha256


@pytest.mark.parametrize(
    ("restated", "back"),
    [
        # negative minutes written in place 40 days back: the same rows, other values
        ("minutes = -165 * (1 + customer_id %% 3)", 40),
        # data_mb restated on the day about to leave the 30-day window: a kept state would
        # take away what it never added and report an impossible sum
        ("data_mb = data_mb + 5000", 30),
    ],
)
def test_a_restatement_that_keeps_the_row_counts_rebuilds_the_windows(
    wh: Settings,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    restated: str,
    back: int,
) -> None:
    schema = f"wh_windows_restated_{back}"
    s = replace(wh, warehouse_schema=schema, home=wh.home.parent / schema)
    day = FIRST + timedelta(days=2)
    try:
        _usage_of_its_own(s, schema)
        features.build_snapshot(s, UC, day - timedelta(days=1))
        changed = day - timedelta(days=back)
        counts = db.scalar(
            s.database_url,
            f"SELECT count(*) FROM {schema}.usage_daily WHERE usage_date = %s",
            (changed,),
        )
        db.scalar(
            s.database_url,
            f"UPDATE {schema}.usage_daily SET {restated} WHERE usage_date = %s "
            f"AND customer_id %% 4 = 0; SELECT 1",
            (changed,),
        )
        assert (
            db.scalar(
                s.database_url,
                f"SELECT count(*) FROM {schema}.usage_daily WHERE usage_date = %s",
                (changed,),
            )
            == counts
        )
        caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
        after = features.build_snapshot(s, UC, day)
        assert _how(caplog)[-1] == "facts"
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"{changed}: {counts:,} rows, content changed" in m for m in warned), warned
        assert any("usage_windows: facts, the kept state disagreeing" in w for w in after.windows)
        # the same snapshot, byte for byte, as a rebuild from the facts
        fresh = features.build_snapshot(_from_facts(s, f"restated_{back}_fresh"), UC, day)
        assert after.sha256 == fresh.sha256
    finally:
        db.scalar(settings.database_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE; SELECT 1")


def test_a_state_whose_step_disagrees_with_its_facts_is_rebuilt_from_the_facts(
    wh: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tonight's slice of a rolled state is recomputed from its facts SQL: a step that
    drifts (here: one late payment too many each day) is caught and not used."""
    step = UC.states["billing_state"].step
    wrong = tmp_path / "billing_state_step.sql"
    good = "coalesce(b.late_payments_180d, 0) + coalesce(m.late, 0)"
    assert good in step.read_text()
    wrong.write_text(step.read_text().replace(good, f"{good} + 1"))
    uc = UC.evolve({"states": {"billing_state": {"step": str(wrong)}}})
    s = _from_facts(wh, "wrong_step")
    features.build_snapshot(s, uc, FIRST)
    caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
    caplog.clear()  # what the next night logs only, whatever earlier tests set the root to
    after = features.build_snapshot(s, uc, FIRST + timedelta(days=1))
    assert _how(caplog, "billing_state") == ["facts"]
    assert _how(caplog, "plan_state") == ["rolled 1 day(s)"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "state billing_state of churn" in warned[0]
    assert "its step disagrees with its facts SQL" in warned[0]
    assert re.search(r"late_payments_180d differs for [\d,]+ of [\d,]+ entities checked", warned[0])
    assert "fix billing_state_step.sql" in warned[0]
    assert any("billing_state: facts, the kept state disagreeing" in w for w in after.windows)
    fresh = features.build_snapshot(
        _from_facts(wh, "wrong_step_fresh"), UC, FIRST + timedelta(days=1)
    )
    assert after.sha256 == fresh.sha256


def test_a_state_over_every_day_is_rebuilt_when_its_oldest_day_is_restated(
    wh: Settings, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """plan_state reads every day of subscriptions (the plan in force may date from the
    first): a fee restated on the very first day is seen, though no window covers it."""
    schema = "wh_windows_plans"
    s = replace(wh, warehouse_schema=schema, home=wh.home.parent / schema)
    day = FIRST + timedelta(days=2)
    try:
        _usage_of_its_own(s, schema, "subscriptions")
        features.build_snapshot(s, UC, day - timedelta(days=1))
        first = db.scalar(s.database_url, f"SELECT min(valid_from) FROM {schema}.subscriptions")
        assert (day - first).days > 100
        db.scalar(
            s.database_url,
            f"UPDATE {schema}.subscriptions SET monthly_fee = monthly_fee + 1 "
            "WHERE valid_from = %s; SELECT 1",
            (first,),
        )
        caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
        caplog.clear()
        after = features.build_snapshot(s, UC, day)
        assert _how(caplog, "plan_state") == ["facts"]
        assert _how(caplog, "billing_state") == ["rolled 1 day(s)"]
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(
            "state plan_state of churn" in m and f"{first}: " in m and "content changed" in m
            for m in warned
        ), warned
        fresh = features.build_snapshot(_from_facts(s, "plans_fresh"), UC, day)
        assert after.sha256 == fresh.sha256
    finally:
        db.scalar(settings.database_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE; SELECT 1")


def test_a_night_read_in_two_parts_at_once_is_the_snapshot_of_one_query(
    wh: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    night = FIRST + timedelta(days=2)
    two = features.build_snapshot(_from_facts(wh, "two_parts"), UC, night)
    monkeypatch.setattr(features, "PARTS", ("",))  # one session, the whole query
    one = features.build_snapshot(_from_facts(wh, "one_part"), UC, night)
    assert two.sha256 == one.sha256 and two.rows == one.rows > 900
