"""The source checks read only the days that may have changed, against a real PostgreSQL.

Night 1 checks a warehouse whose newest day has not landed; the day lands; night 2 checks
it again with what night 1 kept. Whatever happened in between, night 2 must find exactly
what a night reading every day finds (results and evidence per day); ``read_from`` shows
which days it read: from night 1's run date when PostgreSQL's change counters prove the
earlier days unchanged, else the whole lookback.
"""

from __future__ import annotations

import copy
import logging
import time
from datetime import timedelta
from typing import Any

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.run import nightly
from pipeline.stages import source_scans, sources
from pipeline.stages.source_scans import Kept
from pipeline.store import db, ledger
from pipeline.synthetic import warehouse
from tests.conftest import SCORE_DATE
from tests.integration.test_sources import (
    AS_OF,
    CONTRACT,
    DAY_OF,
    LAST,
    broken,
    contract,
    execute,
    url,
)

__all__ = ["url"]  # the module's database, shared with test_sources

NIGHT1 = LAST  # night 1 runs before the last day has landed
TABLES = list(DAY_OF)


# a rule across two dated tables that many joined rows break, on every day
RELATION = {
    "name": "long_use_logs_in",
    "table": "usage_daily",
    "join": "events",
    "using": "customer_id",
    "rule": "usage_daily.minutes < 90 OR events.kind = 'logout'",
}


def night(url: str, schema: str, as_of: Any, earlier: Any = None, **changes: Any) -> Any:
    return sources.observe(
        url,
        schema,
        contract(**({"relations": [RELATION]} | changes)),
        as_of,
        history_days={t: 45 for t in TABLES},
        kept=earlier.kept if earlier else None,
        counts=earlier.counts if earlier else None,
    )


def settled(url: str, schema: str, kept: dict[str, Kept], tables: list[str] = TABLES) -> None:
    """Wait until the statistics show the writes since ``kept`` (a writer's counters reach
    the shared statistics shortly after its commit)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = db.connect(url)
        try:
            now = source_scans.read_counters(conn, schema, tables)
        finally:
            conn.close()
        if all(now.get(t) != kept[t].counters for t in tables):
            return
        time.sleep(0.2)
    raise AssertionError(f"the change counters of {schema} did not move in 30 s")


def two_nights(url: str, *between: str, **changes: Any) -> tuple[Any, Any]:
    """Night 2 observed with what night 1 kept, and a night that reads every day, after
    the last day lands and ``between`` runs (``{s}``: the schema)."""
    held = [
        f"CREATE TABLE {{s}}.held_{t} AS SELECT * FROM {{s}}.{t} WHERE {DAY_OF[t]} = '{LAST}'"
        for t in TABLES
    ]
    held += [f"DELETE FROM {{s}}.{t} WHERE {DAY_OF[t]} = '{LAST}'" for t in TABLES]
    schema = broken(url, *held)
    first = night(url, schema, NIGHT1)
    assert set(first.kept) == set(TABLES)
    lands = [f"INSERT INTO {{s}}.{t} SELECT * FROM {{s}}.held_{t}" for t in TABLES]
    execute(url, ";\n".join(s.format(s=schema) for s in lands))
    for statement in between:
        execute(url, statement.format(s=schema))
    settled(url, schema, first.kept)
    second = night(url, schema, AS_OF, first, **changes)
    full = night(url, schema, AS_OF, **changes)
    assert [r.describe() for r in second.results] == [r.describe() for r in full.results]
    assert second.days == full.days
    for t in TABLES:
        assert second.kept[t].days == full.kept[t].days
        assert second.kept[t].beyond == full.kept[t].beyond
    return second, full


def test_a_night_after_a_clean_load_reads_only_the_new_days(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.stages.source_relations")
    caplog.clear()
    second, full = two_nights(url)
    for t in TABLES:
        assert second.kept[t].read_from == NIGHT1
        assert full.kept[t].read_from == AS_OF - timedelta(days=58)  # 30 days + 28 trailing
    # the rule across tables: the pairs with a newer row only, added to the kept count
    counted = [r.getMessage() for r in caplog.records if r.name.endswith("source_relations")]
    assert len(counted) == 1, counted
    assert f"usage_daily from {NIGHT1} or of events from {NIGHT1} counted" in counted[0]
    broken = second.counts["long_use_logs_in"].broken
    assert broken == full.counts["long_use_logs_in"].broken > 0
    added = int(counted[0].split(" counted (")[1].split()[0])
    assert 0 < added < broken and counted[0].endswith(f"the others kept ({broken - added})")


@pytest.mark.parametrize(
    "change",
    [
        # restated in place: the same rows, other values
        "UPDATE {s}.usage_daily SET minutes = minutes + 1 WHERE usage_date = '2024-10-30'",
        # a late row on an old day (inserted: only the proof can see where it went)
        "INSERT INTO {s}.usage_daily SELECT * FROM {s}.usage_daily "
        "WHERE usage_date = '2024-10-30' LIMIT 1",
        "DELETE FROM {s}.usage_daily WHERE usage_date = '2024-10-30' AND customer_id = 3",
        # reloaded whole: a new file, the same rows
        "CREATE TABLE {s}.copied AS TABLE {s}.usage_daily; TRUNCATE {s}.usage_daily; "
        "INSERT INTO {s}.usage_daily SELECT * FROM {s}.copied",
        # rolled back: PostgreSQL counts attempted changes, so the proof fails safe
        "BEGIN; UPDATE {s}.usage_daily SET minutes = 0 WHERE usage_date = '2024-10-30'; ROLLBACK",
    ],
    ids=["restated", "late_row", "deleted", "reloaded", "rolled_back"],
)
def test_a_night_after_past_days_changed_reads_every_day(url: str, change: str) -> None:
    second, full = two_nights(url, change)
    assert second.kept["usage_daily"].read_from == full.kept["usage_daily"].read_from
    assert second.kept["usage_daily"].read_from < NIGHT1
    assert second.kept["events"].read_from == NIGHT1  # the other tables: only the new days


def test_a_changed_contract_reads_every_day(url: str) -> None:
    tables = copy.deepcopy(CONTRACT["tables"])
    tables["usage_daily"]["rules"] = [*tables["usage_daily"]["rules"], "minutes < 1000"]
    second, full = two_nights(url, tables=tables)
    assert second.kept["usage_daily"].read_from == full.kept["usage_daily"].read_from < NIGHT1


def test_the_night_keeps_its_scans_and_the_next_reads_from_its_date(isolated: Settings) -> None:
    """Through the nightly stage: what a night keeps (tallies, counters, the rows beyond
    its date) comes back whole from the serving database, and the next night reads every
    dated table from the earlier night's date; after a restatement, every day, and the
    restated day is named."""
    uc = usecase.load("churn")
    days = [SCORE_DATE - timedelta(days=2), SCORE_DATE - timedelta(days=1)]
    runs = [ledger.RunContext("churn", d, f"scans-{i}") for i, d in enumerate(days)]
    ledger.start(isolated, runs[0])
    first = nightly.check_sources(isolated, uc, runs[0])
    ledger.start(isolated, runs[1])
    kept = source_scans.previous(isolated, runs[1]).kept
    dated = set(kept)
    assert dated == set(warehouse.TABLE_ORDER)
    assert all(k.as_of == days[0] and k.counters is not None for k in kept.values())
    assert all(set(k.days) == set(first_days(isolated, runs[0])[t]) for t, k in kept.items())
    second = nightly.check_sources(isolated, uc, runs[1])
    assert second["read_from"] == {t: str(days[0]) for t in dated}
    assert first["read_from"]["usage_daily"] < str(days[0])

    restated = days[0] - timedelta(days=20)
    db.scalar(
        isolated.warehouse_url,
        "UPDATE warehouse.usage_daily SET minutes = minutes + 1 WHERE usage_date = %s "
        "AND customer_id %% 7 = 0; SELECT 1",
        (restated,),
    )
    kept = source_scans.previous(isolated, ledger.RunContext("churn", SCORE_DATE, "x")).kept
    settled(isolated.warehouse_url, "warehouse", kept, ["usage_daily"])
    third_run = ledger.RunContext("churn", SCORE_DATE, "scans-2")
    ledger.start(isolated, third_run)
    third = nightly.check_sources(isolated, uc, third_run)
    assert third["read_from"]["usage_daily"] < str(days[1])
    assert third["read_from"]["invoices"] == str(days[1])
    warned = db.scalar(
        isolated.database_url,
        "SELECT found FROM monitoring.checks WHERE run_id = 'scans-2' "
        "AND check_name = 'history_unchanged' AND target = 'warehouse.usage_daily'",
    )
    assert f"{restated}: " in warned and "content changed" in warned, warned


def first_days(settings: Settings, run: ledger.RunContext) -> dict[str, set]:
    return {t: set(d) for t, d in source_scans.run_days(settings, run).items()}


def unique_found(url: str, schema: str, target: str) -> str:
    results = sources.check_sources(url, schema, contract(), AS_OF)
    found = [r for r in results if r.check == "unique_key" and r.target == f"{schema}.{target}"]
    assert len(found) == 1, [r.describe() for r in results]
    return ("passed: " if found[0].passed else "FAILED: ") + found[0].found


def test_a_unique_index_on_not_null_columns_proves_the_key_without_counting(url: str) -> None:
    schema = broken(
        url,
        "ALTER TABLE {s}.customers ALTER COLUMN customer_id SET NOT NULL",
        "CREATE UNIQUE INDEX customers_key ON {s}.customers (customer_id)",
        # unique on (customer_id, usage_date) follows from a unique index on fewer columns
        "ALTER TABLE {s}.usage_daily ALTER COLUMN customer_id SET NOT NULL",
        "ALTER TABLE {s}.usage_daily ALTER COLUMN usage_date SET NOT NULL",
        "CREATE UNIQUE INDEX usage_key ON {s}.usage_daily (usage_date, customer_id) "
        "INCLUDE (minutes)",
    )
    assert unique_found(url, schema, "customers.customer_id") == (
        "passed: 0 duplicate rows: unique index customers_key on NOT NULL columns"
    )
    assert unique_found(url, schema, "usage_daily.(customer_id, usage_date)") == (
        "passed: 0 duplicate rows: unique index usage_key on NOT NULL columns"
    )


NOT_NULL = "ALTER TABLE {s}.customers ALTER COLUMN customer_id SET NOT NULL"


@pytest.mark.parametrize(
    ("statements", "found"),
    [
        # NULL is a key value like any other for the check, never for the index
        (
            [
                "CREATE UNIQUE INDEX k ON {s}.customers (customer_id)",
                "INSERT INTO {s}.customers (customer_id) VALUES (NULL), (NULL)",
            ],
            "FAILED: 1 duplicate rows",
        ),
        # a partial index proves nothing of the rows it leaves out
        (
            [
                NOT_NULL,
                "INSERT INTO {s}.customers (customer_id, segment) VALUES (3, 'other')",
                "CREATE UNIQUE INDEX k ON {s}.customers (customer_id) WHERE segment = 'retail'",
            ],
            "FAILED: 1 duplicate rows",
        ),
        # nor does an index on an expression: the key is counted
        (
            [NOT_NULL, "CREATE UNIQUE INDEX k ON {s}.customers ((customer_id + 0))"],
            "passed: 0 duplicate rows",
        ),
    ],
    ids=["nullable", "partial", "expression"],
)
def test_an_index_that_proves_nothing_leaves_the_key_counted(
    url: str, statements: list[str], found: str
) -> None:
    schema = broken(url, *statements)
    assert unique_found(url, schema, "customers.customer_id") == found
