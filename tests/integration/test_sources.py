"""Source contracts against a real PostgreSQL: a ``date`` table, a ``timestamp`` table, a
``timestamptz`` event table whose events fall late in the evening in New York (so the
day boundary matters), and dimension tables without a date column.

The module creates its own database (``nightscore_sources_<random>``) and drops it at
the end. Each test copies the clean tables of schema ``base`` into its own schema and
breaks them in one way.
"""

from __future__ import annotations

import copy
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from psycopg2 import sql

from pipeline.conf import contract as contracts
from pipeline.conf.urls import with_database, with_role
from pipeline.core.errors import ConfigError, SourceError
from pipeline.stages import source_days, sources
from pipeline.stages.checks import CheckResult
from pipeline.store import db

AS_OF = date(2024, 11, 20)  # the run scores this day: facts strictly before it count
LAST = AS_OF - timedelta(days=1)
ZONE = "America/New_York"
TABLES = ("usage_daily", "readings", "events", "customers", "invoice_lines")

BASE = f"""
CREATE SCHEMA base;

-- date: 20 customers a day for 60 days
CREATE TABLE base.usage_daily (
    customer_id integer, usage_date date, minutes integer, data_mb bigint, plan varchar(10)
);
INSERT INTO base.usage_daily
SELECT c, d::date, (c * 7 + extract(day FROM d)::int) % 100, c * 10, 'basic'
FROM generate_series(1, 20) c,
     generate_series(TIMESTAMP '{AS_OF - timedelta(days=60)}', TIMESTAMP '{LAST}', '1 day') d;

-- timestamp (local time): 10 readings a day, late in the evening, for 40 days
CREATE TABLE base.readings (reading_id bigint, read_at timestamp, value numeric);
INSERT INTO base.readings
SELECT row_number() OVER (), d + interval '23 hours' + i * interval '5 minutes', i
FROM generate_series(TIMESTAMP '{AS_OF - timedelta(days=40)}', TIMESTAMP '{LAST}', '1 day') d,
     generate_series(0, 9) i;

-- timestamptz: 12 events a day between 22:00 and 23:39 New York time (the next day in UTC)
CREATE TABLE base.events (
    event_id bigint, customer_id integer, occurred_at timestamptz, kind varchar(20)
);
INSERT INTO base.events
SELECT row_number() OVER (), i + 1,
       (d + interval '22 hours' + i * interval '9 minutes') AT TIME ZONE '{ZONE}', 'login'
FROM generate_series(TIMESTAMP '{AS_OF - timedelta(days=40)}', TIMESTAMP '{LAST}', '1 day') d,
     generate_series(0, 11) i;

-- dimensions: no date column
CREATE TABLE base.customers (
    customer_id integer, email text, segment varchar(10), score double precision, active boolean
);
INSERT INTO base.customers
SELECT c, 'c' || c || '@example.com', 'retail', c / 20.0, true FROM generate_series(1, 20) c;

CREATE TABLE base.invoice_lines (invoice_id bigint, line_no smallint, amount numeric);
INSERT INTO base.invoice_lines
SELECT i, l, 10 * l FROM generate_series(1, 10) i, generate_series(1, 3) l;
"""

VOLUME = {"min_ratio": 0.5, "max_ratio": 2.0, "trailing_days": 28}
CONTRACT: dict[str, Any] = {
    "window_days": 30,
    "max_null_fraction": 0.01,
    "timezone": ZONE,
    "tables": {
        "usage_daily": {
            "date_column": "usage_date",
            "fresh": True,
            "volume": VOLUME,
            "rules": ["minutes >= 0", "data_mb >= 0", "customer_id % 1 = 0 -- a % and a comment"],
            "unique": [["customer_id", "usage_date"]],
            "columns": {
                "customer_id": "integer",
                "usage_date": "date",
                "minutes": "integer",
                "data_mb": "integer",  # bigint: the integer family
                "plan": "text",  # character varying: the text family
            },
        },
        "readings": {
            "date_column": "read_at",
            "fresh": True,
            "volume": VOLUME,
            "rules": ["value >= 0"],
            "unique": ["reading_id"],
            "columns": {"reading_id": "bigint", "read_at": "timestamp", "value": "number"},
        },
        "events": {
            "date_column": "occurred_at",
            "fresh": True,
            "volume": VOLUME,
            "rules": ["customer_id > 0"],
            "unique": ["event_id"],
            "columns": {
                "event_id": "integer",
                "customer_id": "integer",
                "occurred_at": "timestamptz",
                "kind": "text",
            },
        },
        "customers": {
            "unique": ["customer_id"],
            "rules": ["score BETWEEN 0 AND 1"],
            "columns": {
                "customer_id": "integer",
                "email": {"type": "text", "max_null_fraction": 0.05},
                "segment": "text",
                "score": "double precision",
                "active": "boolean",
            },
        },
        "invoice_lines": {
            "unique": [["invoice_id", "line_no"]],
            "rules": ["amount >= 0"],
            "columns": {"invoice_id": "bigint", "line_no": "integer", "amount": "numeric"},
        },
    },
}

# How each dated table's rows of one day are selected, for breaking that day.
DAY_OF = {
    "usage_daily": "usage_date",
    "readings": "CAST(read_at AS date)",
    "events": f"CAST(occurred_at AT TIME ZONE '{ZONE}' AS date)",
}
DATE_COLUMN = {"usage_daily": "usage_date", "readings": "read_at", "events": "occurred_at"}


def contract(**changes: Any) -> contracts.Contract:
    """The base contract with top-level keys replaced (``tables`` replaces the tables)."""
    data = copy.deepcopy(CONTRACT) | changes
    return contracts.Contract.model_validate(data)


def only(*tables: str, **changes: Any) -> contracts.Contract:
    """The base contract restricted to ``tables``."""
    return contract(tables={t: CONTRACT["tables"][t] for t in tables}, **changes)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = os.environ.get(
        "NIGHTSCORE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    name = f"nightscore_sources_{secrets.token_hex(4)}"
    admin = db.connect(with_database(server, "postgres"), autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        target = with_database(server, name)
        execute(target, BASE)
        yield target
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    finally:
        admin.close()


def execute(url: str, statements: str) -> None:
    conn = db.connect(url, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(statements)
    finally:
        conn.close()


def broken(url: str, *statements: str) -> str:
    """A new schema holding a copy of ``base`` changed by ``statements`` (``{s}`` is the
    schema); returns its name."""
    schema = f"wh_{secrets.token_hex(4)}"
    copies = [f"CREATE TABLE {schema}.{t} AS TABLE base.{t}" for t in TABLES]
    changes = [s.format(s=schema) for s in statements]
    execute(url, ";\n".join([f"CREATE SCHEMA {schema}", *copies, *changes]))
    return schema


def run(
    url: str,
    schema: str,
    rules: contracts.Contract | None = None,
    timezone: str = "UTC",
) -> list[CheckResult]:
    return sources.check_sources(url, schema, rules or contract(), AS_OF, timezone)


def one(results: list[CheckResult], check: str, target: str) -> CheckResult:
    found = [r for r in results if r.check == check and r.target == target]
    assert len(found) == 1, [r.describe() for r in results]
    return found[0]


def failures(results: list[CheckResult]) -> list[str]:
    return [r.describe() for r in results if not r.passed]


# -- a clean warehouse -------------------------------------------------------------------


def test_clean_warehouse_passes_every_check(url: str) -> None:
    results = run(url, "base")
    assert failures(results) == []
    for table, column in DATE_COLUMN.items():
        fresh = one(results, "fresh_through", f"base.{table}.{column}")
        assert fresh.found == f"latest {LAST}"
        volume = one(results, "daily_volume", f"base.{table} on {LAST}")
        assert "(1.00 x)" in volume.found
        assert one(results, "no_future_rows", f"base.{table}.{column}").found == "0 rows"
    # the timestamptz table is the one today's checks.py gets wrong (datetime vs date)
    assert one(results, "fresh_through", "base.events.occurred_at").passed
    assert one(results, "unique_key", "base.usage_daily.(customer_id, usage_date)").passed
    assert len([r for r in results if r.check == "value_rule"]) == 7


def test_dimension_tables_get_no_time_checks(url: str) -> None:
    results = run(url, "base")
    by_table = {
        t: {r.check for r in results if r.target.startswith(f"base.{t}")}
        for t in ("customers", "invoice_lines")
    }
    assert by_table == {
        "customers": {"unique_key", "value_rule"},
        "invoice_lines": {"unique_key", "value_rule"},
    }


# -- freshness, volume and future rows, for date, timestamp and timestamptz ---------------


@pytest.mark.parametrize("table", list(DAY_OF))
def test_a_missing_last_day_fails_freshness_and_volume(url: str, table: str) -> None:
    schema = broken(url, f"DELETE FROM {{s}}.{table} WHERE {DAY_OF[table]} = '{LAST}'")
    results = run(url, schema)
    fresh = one(results, "fresh_through", f"{schema}.{table}.{DATE_COLUMN[table]}")
    assert not fresh.passed
    assert fresh.found == f"latest {LAST - timedelta(days=1)}"
    volume = one(results, "daily_volume", f"{schema}.{table} on {LAST}")
    assert not volume.passed and volume.found.startswith("0 rows")
    assert len(failures(results)) == 2


def test_a_stale_table_reports_its_newest_day(url: str) -> None:
    # the newest event is far older than the scanned window: looked up on its own
    stale = AS_OF - timedelta(days=36)
    schema = broken(url, f"DELETE FROM {{s}}.events WHERE {DAY_OF['events']} > '{stale}'")
    results = run(url, schema, only("events"))
    assert one(results, "fresh_through", f"{schema}.events.occurred_at").found == f"latest {stale}"
    empty = broken(url, "DELETE FROM {s}.events")
    results = run(url, empty, only("events"))
    fresh = one(results, "fresh_through", f"{empty}.events.occurred_at")
    assert not fresh.passed and fresh.found == f"no rows dated before {AS_OF}"


@pytest.mark.parametrize(
    ("table", "keep", "kept"),
    [
        ("usage_daily", "customer_id % 10 = 0", 2),
        ("readings", "value = 0", 1),
        ("events", "customer_id = 1", 1),
    ],
)
def test_a_tenth_of_the_volume_fails_daily_volume(
    url: str, table: str, keep: str, kept: int
) -> None:
    schema = broken(
        url, f"DELETE FROM {{s}}.{table} WHERE {DAY_OF[table]} = '{LAST}' AND NOT ({keep})"
    )
    results = run(url, schema)
    volume = one(results, "daily_volume", f"{schema}.{table} on {LAST}")
    assert not volume.passed
    assert volume.found.startswith(f"{kept} rows")
    assert one(results, "fresh_through", f"{schema}.{table}.{DATE_COLUMN[table]}").passed
    assert failures(results) == [volume.describe()]


@pytest.mark.parametrize(
    ("table", "row"),
    [
        ("usage_daily", "(1, DATE '2099-01-01', 5, 5, 'basic')"),
        ("readings", "(999, TIMESTAMP '2099-01-01 00:10', 1)"),
        ("events", "(999, 1, now() + interval '2 days', 'login')"),
    ],
)
def test_future_rows_fail_no_future_rows(url: str, table: str, row: str) -> None:
    schema = broken(url, f"INSERT INTO {{s}}.{table} VALUES {row}")
    results = run(url, schema)
    future = one(results, "no_future_rows", f"{schema}.{table}.{DATE_COLUMN[table]}")
    assert not future.passed and future.found == "1 rows"
    assert failures(results) == [future.describe()]


def test_days_of_timestamptz_rows_follow_the_contract_time_zone(url: str) -> None:
    # The New York evening of the last day is the small hours of AS_OF in UTC.
    schema = broken(url, f"DELETE FROM {{s}}.events WHERE {DAY_OF['events']} = '{LAST}'")
    in_new_york = run(url, schema, only("events"))
    assert {r.check for r in in_new_york if not r.passed} == {"fresh_through", "daily_volume"}
    # Counted in UTC (no contract zone, the caller's), the last day still has 12 events.
    in_utc = run(url, schema, only("events", timezone=None), timezone="UTC")
    assert failures(in_utc) == []
    # The caller's zone applies when the contract has none.
    assert failures(run(url, schema, only("events", timezone=None), timezone=ZONE)) != []


# -- shape: tables, columns and type families --------------------------------------------


def test_type_families_accept_and_reject(url: str) -> None:
    tables = copy.deepcopy(CONTRACT["tables"])
    tables["events"]["columns"] |= {"occurred_at": "timestamp", "event_id": "number"}
    tables["customers"]["columns"] |= {"score": "number", "segment": "text"}
    assert failures(run(url, "base", contract(tables=tables))) == []

    tables["customers"]["columns"]["email"] = "integer"
    tables["readings"]["columns"]["read_at"] = "timestamptz"
    tables["invoice_lines"]["columns"]["amount"] = "double precision"
    results = run(url, "base", contract(tables=tables))
    assert failures(results) == [
        "FAILED: column_type on base.readings.read_at: expected timestamptz, "
        "found timestamp without time zone",
        "FAILED: column_type on base.customers.email: expected integer, found text",
        "FAILED: column_type on base.invoice_lines.amount: expected double precision, "
        "found numeric",
    ]
    # a table whose shape is wrong gets no data checks
    assert not [r for r in results if r.target.startswith("base.customers") and r.passed]
    assert not [r for r in results if r.target.startswith("base.readings") and r.passed]


def test_missing_table_and_column(url: str) -> None:
    tables = copy.deepcopy(CONTRACT["tables"])
    tables["customers"]["columns"]["loyalty_tier"] = "text"
    tables["plans"] = {"columns": {"plan_id": "integer"}}
    results = run(url, "base", contract(tables=tables))
    assert failures(results) == [
        "FAILED: column_exists on base.customers.loyalty_tier: expected column of type text, "
        "found no such column (columns: active, customer_id, email, score, segment)",
        "FAILED: table_exists on base.plans: expected the table, found no such table",
    ]


# -- values, keys and nulls --------------------------------------------------------------


def test_dimension_table_nulls_keys_and_rules(url: str) -> None:
    schema = broken(
        url,
        "UPDATE {s}.customers SET email = NULL WHERE customer_id IN (1, 2)",
        "UPDATE {s}.customers SET score = 3 WHERE customer_id = 3",
        "INSERT INTO {s}.customers VALUES (4, 'again@example.com', 'retail', 0.5, true)",
    )
    results = [r for r in run(url, schema) if r.target.startswith(f"{schema}.customers")]
    assert failures(results) == [
        f"FAILED: value_rule on {schema}.customers: expected every row has score BETWEEN 0 "
        "AND 1, found 1 rows violate it",
        f"FAILED: unique_key on {schema}.customers.customer_id: expected one row per key, "
        "found 1 duplicate rows",
        f"FAILED: null_fraction on {schema}.customers.email: expected <= 5% nulls, "
        "found 9.5% nulls in the whole table",
    ]


def test_column_null_limit_overrides_the_default(url: str) -> None:
    # one null in 20 rows: 5%, within email's own 5% but above the 1% default for score
    schema = broken(
        url,
        "UPDATE {s}.customers SET email = NULL WHERE customer_id = 1",
        "UPDATE {s}.customers SET score = NULL WHERE customer_id = 1",
    )
    assert failures(run(url, schema, only("customers"))) == [
        f"FAILED: null_fraction on {schema}.customers.score: expected <= 1% nulls, "
        "found 5.0% nulls in the whole table"
    ]


def test_composite_unique_keys_detect_duplicates_null_safely(url: str) -> None:
    schema = broken(
        url,
        "INSERT INTO {s}.invoice_lines VALUES (1, 1, 5)",
        "INSERT INTO {s}.invoice_lines VALUES (99, NULL, 5), (99, NULL, 6), (100, NULL, 1)",
    )
    check = one(
        run(url, schema, only("invoice_lines")),
        "unique_key",
        f"{schema}.invoice_lines.(invoice_id, line_no)",
    )
    assert not check.passed
    assert check.found == "2 duplicate rows"  # (1, 1) twice and (99, NULL) twice


@pytest.mark.parametrize(("nulls", "dupes"), [(1, 0), (2, 1), (3, 2)])
def test_null_keys_count_as_one_key_value(url: str, nulls: int, dupes: int) -> None:
    schema = broken(
        url, f"UPDATE {{s}}.customers SET customer_id = NULL WHERE customer_id <= {nulls}"
    )
    results = run(url, schema, only("customers"))
    assert one(results, "unique_key", f"{schema}.customers.customer_id").found == (
        f"{dupes} duplicate rows"
    )
    assert not one(results, "null_fraction", f"{schema}.customers.customer_id").passed


@pytest.mark.parametrize(
    ("day", "counted"),
    [
        (AS_OF - timedelta(days=31), False),  # before the window
        (AS_OF - timedelta(days=30), True),  # its first day
        (LAST, True),
        (AS_OF, False),  # the scored day itself is not a fact before it
    ],
)
def test_rules_and_nulls_look_at_the_window(url: str, day: date, counted: bool) -> None:
    schema = broken(
        url,
        # 20 rows on `day` with a negative minutes and a null data_mb
        "INSERT INTO {s}.usage_daily SELECT customer_id + 100, "
        f"DATE '{day}', -1, NULL, plan FROM {{s}}.usage_daily WHERE usage_date = '{LAST}'",
        # New York day `day` at 23:00 is the next day in UTC
        f"INSERT INTO {{s}}.events VALUES (999, -1, TIMESTAMP '{day} 23:00' AT TIME ZONE '{ZONE}',"
        " 'login')",
    )
    results = run(url, schema, only("usage_daily", "events"))
    rules = {
        (r.target, r.expected.rsplit(" has ", 1)[1]): r.passed
        for r in results
        if r.check == "value_rule"
    }
    assert rules[(f"{schema}.usage_daily", "minutes >= 0")] is not counted
    assert rules[(f"{schema}.events", "customer_id > 0")] is not counted
    nulls = [r for r in results if r.check == "null_fraction"]
    assert [r.target for r in nulls] == ([f"{schema}.usage_daily.data_mb"] if counted else [])


# -- a check whose SQL fails is a failed check, not a traceback --------------------------

SQL_ERRORS = {
    "syntax": ("{col} >=", "syntax error at or near"),
    "undefined column": ("nosuch >= 0", 'column "nosuch" does not exist'),
    "type mismatch": ("{col} >= 'abc'", "invalid input syntax for type {type}"),
    "division by zero": ("{col} / 0 >= 0", "division by zero"),
}


@pytest.mark.parametrize(("rule", "message"), list(SQL_ERRORS.values()), ids=list(SQL_ERRORS))
@pytest.mark.parametrize(
    ("table", "col", "dtype"),
    [("usage_daily", "minutes", "integer"), ("customers", "score", "double precision")],
)
def test_a_failing_rule_is_a_failed_check(
    url: str, rule: str, message: str, table: str, col: str, dtype: str
) -> None:
    bad = rule.format(col=col)
    tables = copy.deepcopy(CONTRACT["tables"])
    tables[table]["rules"] = [*tables[table]["rules"], bad]
    results = run(url, "base", contract(tables=tables))
    assert len(results) == len(run(url, "base")) + 1  # no check went missing
    failed = [r for r in results if not r.passed]
    assert len(failed) == 1, [r.describe() for r in failed]
    assert (failed[0].check, failed[0].target) == ("value_rule", f"base.{table}")
    assert bad in failed[0].expected
    assert failed[0].found.startswith("the check's query failed: ")
    assert message.format(type=dtype) in failed[0].found
    assert "\n" not in failed[0].found


def test_permission_denied_fails_the_checks_of_that_table_and_column(url: str) -> None:
    role = f"nightscore_sources_ro_{secrets.token_hex(4)}"
    execute(
        url,
        f"""
        CREATE ROLE {role} NOLOGIN;
        GRANT USAGE ON SCHEMA base TO {role};
        GRANT SELECT ON base.usage_daily, base.readings, base.invoice_lines TO {role};
        GRANT SELECT (customer_id, segment, score, active) ON base.customers TO {role};
        """,
    )
    try:
        results = run(with_role(url, role), "base")
    finally:
        execute(url, f"DROP OWNED BY {role}; DROP ROLE {role}")
    failed = {(r.check, r.target): r.found for r in results if not r.passed}
    events = "the check's query failed: permission denied for table events"
    assert failed == {
        ("no_future_rows", "base.events.occurred_at"): events,
        ("fresh_through", "base.events.occurred_at"): events,
        ("daily_volume", f"base.events on {LAST}"): events,
        ("days_complete", "base.events.occurred_at"): events,
        ("value_rule", "base.events"): events,
        ("unique_key", "base.events.event_id"): events,
        ("null_fraction", "base.events.event_id"): events,
        ("null_fraction", "base.events.customer_id"): events,
        ("null_fraction", "base.events.occurred_at"): events,
        ("null_fraction", "base.events.kind"): events,
        # a column-level grant: only the unreadable column fails
        ("null_fraction", "base.customers.email"): "the check's query failed: permission "
        "denied for table customers",
    }
    assert one(results, "unique_key", "base.customers.customer_id").passed


def test_a_statement_timeout_is_a_failed_check(url: str) -> None:
    slow = f"{url}?options={quote('-c statement_timeout=300')}"
    tables = {"customers": CONTRACT["tables"]["customers"] | {"rules": ["pg_sleep(0.1) IS NULL"]}}
    started = time.monotonic()
    results = run(slow, "base", contract(tables=tables))
    assert time.monotonic() - started < 10
    rule = one(results, "value_rule", "base.customers")
    assert not rule.passed
    assert rule.found == "the check's query failed: canceling statement due to statement timeout"


def test_unreachable_warehouse_raises_source_error() -> None:
    with pytest.raises(SourceError, match="cannot connect"):
        sources.check_sources(
            "postgresql://postgres@127.0.0.1:1/nowhere", "base", contract(), AS_OF
        )


def test_unknown_time_zone_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="Mars/Olympus_Mons"):
        run(url, "base", contract(timezone=None), timezone="Mars/Olympus_Mons")
    with pytest.raises(ConfigError, match="Mars/Olympus_Mons"):
        sources.history_start(url, "base", contract(timezone=None), AS_OF, "Mars/Olympus_Mons")


def test_each_table_is_read_in_at_most_two_scans(url: str) -> None:
    """One grouped range scan per dated table, plus one for its unique keys; one scan
    per dimension table. (One pass for both, a GROUPING SETS of the days and the whole
    table, measured 1.1-2.5x slower per table at 300k customers: it sorts the whole table.)"""
    schema = broken(url)
    run(url, schema)
    conn = db.connect(url, autocommit=True)
    try:
        with conn.cursor() as cur:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # table statistics are flushed at backend exit
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name = 'nightscore'"
                )
                if cur.fetchone()[0] == 0:
                    break
                time.sleep(0.05)
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute(
                "SELECT relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0) "
                "FROM pg_stat_user_tables WHERE schemaname = %s",
                (schema,),
            )
            scans = dict(cur.fetchall())
    finally:
        conn.close()
    assert scans == {
        "usage_daily": 2,
        "readings": 2,
        "events": 2,
        "customers": 1,
        "invoice_lines": 1,
    }


# -- the start of the history ------------------------------------------------------------


def test_history_start_is_the_earliest_day_before_the_date(url: str) -> None:
    assert sources.history_start(url, "base", contract(), AS_OF) == AS_OF - timedelta(days=60)
    assert sources.history_start(url, "base", only("readings"), AS_OF) == AS_OF - timedelta(days=40)
    # events begin at 22:00 New York time: the next day in UTC
    events = only("events", timezone=None)
    assert sources.history_start(url, "base", events, AS_OF, ZONE) == AS_OF - timedelta(days=40)
    assert sources.history_start(url, "base", events, AS_OF, "UTC") == AS_OF - timedelta(days=39)
    # only rows dated before `before` count
    later = AS_OF - timedelta(days=59)
    assert sources.history_start(url, "base", contract(), later) == AS_OF - timedelta(days=60)
    assert sources.history_start(url, "base", contract(), AS_OF - timedelta(days=60)) is None


def test_history_start_is_none_without_dated_tables(url: str) -> None:
    assert sources.history_start(url, "base", only("customers", "invoice_lines"), AS_OF) is None


def test_history_start_names_a_missing_table(url: str) -> None:
    schema = broken(url, "DROP TABLE {s}.readings")
    with pytest.raises(SourceError, match=f"{schema}.readings.read_at"):
        sources.history_start(url, schema, contract(), AS_OF)


# -- classes of bad data that used to pass -----------------------------------------------


@pytest.mark.parametrize(
    ("statement", "target"),
    [
        ("UPDATE {s}.readings SET value = 'NaN' WHERE reading_id % 50 = 0", "{s}.readings.value"),
        (
            "UPDATE {s}.customers SET score = 'Infinity' WHERE customer_id = 3",
            "{s}.customers.score",
        ),
        # a numeric column widened to double precision still passes the `number` family
        (
            "ALTER TABLE {s}.readings ALTER COLUMN value TYPE double precision; "
            "UPDATE {s}.readings SET value = '-Infinity' WHERE reading_id % 50 = 0",
            "{s}.readings.value",
        ),
    ],
)
def test_nan_and_infinity_fail_though_nan_passes_every_comparison(
    url: str, statement: str, target: str
) -> None:
    schema = broken(url, statement)
    results = run(url, schema)
    bad = one(results, "finite", target.format(s=schema))
    assert not bad.passed and "NaN or infinite" in bad.found
    if "'NaN'" in statement:
        # NaN >= 0 is true in PostgreSQL: the value rule alone let it through
        assert one(results, "value_rule", f"{schema}.readings").passed


def test_any_null_entity_key_fails_even_under_the_null_limit(url: str) -> None:
    schema = broken(
        url,
        "UPDATE {s}.events SET customer_id = NULL "
        "WHERE occurred_at = (SELECT max(occurred_at) FROM {s}.events)",
    )
    under_limit = run(url, schema)  # 1 row in 480: under the 1% limit
    assert all(r.passed for r in under_limit if r.check == "null_fraction")
    keyed = sources.check_sources(url, schema, contract(), AS_OF, "UTC", "customer_id")
    bad = one(keyed, "null_fraction", f"{schema}.events.customer_id")
    assert bad.expected == "<= 0% nulls" and not bad.passed
    declared = contract(
        tables={"events": CONTRACT["tables"]["events"] | {"not_null": ["customer_id"]}}
    )
    assert not one(
        run(url, schema, declared), "null_fraction", f"{schema}.events.customer_id"
    ).passed


def test_a_fact_loaded_twice_fails_its_fact_key(url: str) -> None:
    schema = broken(url, "INSERT INTO {s}.events SELECT * FROM {s}.events WHERE event_id <= 12")
    bad = one(run(url, schema), "unique_key", f"{schema}.events.event_id")
    assert not bad.passed and bad.found == "12 duplicate rows"


def test_copies_older_than_the_counted_days_fail_the_key_and_leave_the_days_alone(
    url: str,
) -> None:
    """The unique key is checked over the whole table; the rows per day (and every other
    check) still count only the scanned days, which start 30 days before the run (and 28
    days earlier for a table with a volume check: the window's first days have peers)."""
    first = AS_OF - timedelta(days=30)
    schema = broken(
        url,
        "INSERT INTO {s}.events SELECT * FROM {s}.events "
        f"WHERE occurred_at < TIMESTAMPTZ '{first - timedelta(days=5)} 00:00 {ZONE}'",
    )
    events = {k: v for k, v in CONTRACT["tables"]["events"].items() if k != "volume"}
    rules = contract(tables={"events": events})
    observed = sources.observe(url, schema, rules, AS_OF, "UTC")
    bad = one(observed.results, "unique_key", f"{schema}.events.event_id")
    assert not bad.passed and bad.found == "60 duplicate rows"  # 5 days of 12 events
    clean = sources.observe(url, "base", rules, AS_OF, "UTC")
    assert observed.days == clean.days
    assert min(observed.days["events"]) == first


def test_one_connection_or_two_find_the_same(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = broken(
        url,
        "INSERT INTO {s}.events SELECT * FROM {s}.events WHERE event_id <= 12",
        "UPDATE {s}.usage_daily SET minutes = -1 WHERE customer_id = 3",
        "DELETE FROM {s}.readings WHERE read_at > (SELECT max(read_at) - interval '1 day' "
        "FROM {s}.readings)",
    )
    two = sources.observe(url, schema, contract(), AS_OF, "UTC")
    monkeypatch.setattr(sources, "CHECK_CONNECTIONS", 1)
    one_connection = sources.observe(url, schema, contract(), AS_OF, "UTC")
    assert [r.describe() for r in two.results] == [r.describe() for r in one_connection.results]
    assert two.days == one_connection.days
    assert len(failures(two.results)) >= 3


def test_every_check_connection_reads_the_snapshot_the_checks_began_with(
    url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Rows committed while the checks run (here: once the snapshot is exported, before
    the second connection imports it) are seen by no check. The first table's checks take
    a while (a slow rule), so each connection measures a dated table."""
    schema = broken(url)
    slow = CONTRACT["tables"]["usage_daily"] | {"rules": ["pg_sleep(0.001) IS NOT NULL"]}
    rules = contract(tables=CONTRACT["tables"] | {"usage_daily": slow})
    marker = tmp_path / "paused"
    monkeypatch.setenv("NIGHTSCORE_FAULT_PAUSE", "source_snapshot_exported")
    monkeypatch.setenv("NIGHTSCORE_FAULT_PAUSE_FILE", str(marker))
    monkeypatch.setenv("NIGHTSCORE_FAULT_PAUSE_SECONDS", "1")
    with ThreadPoolExecutor(1) as pool:
        checking = pool.submit(sources.observe, url, schema, rules, AS_OF, "UTC")
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), "the checks never reached the export"
        execute(
            url,
            f"INSERT INTO {schema}.usage_daily VALUES (1, '2099-01-01', 1, 1, 'basic');"
            f"INSERT INTO {schema}.readings VALUES (999, '2099-01-01 12:00', 1);"
            f"INSERT INTO {schema}.events VALUES (999, 1, '2099-01-01 12:00Z', 'login');",
        )
        during = checking.result(timeout=60)
    future = [r for r in during.results if r.check == "no_future_rows"]
    assert len(future) == 3 and all(r.passed for r in future), [r.describe() for r in future]
    monkeypatch.delenv("NIGHTSCORE_FAULT_PAUSE")
    after = [r for r in run(url, schema, rules) if r.check == "no_future_rows"]
    assert not any(r.passed for r in after)  # the rows are there for the next run to see


RELATION = {
    "name": "events_after_signup",
    "table": "events",
    "join": "customers",
    "using": "customer_id",
    "rule": "events.occurred_at > TIMESTAMPTZ '2020-01-01'",
}


def test_a_relation_across_tables_catches_contradicting_facts(url: str) -> None:
    rules = only("events", "customers", relations=[RELATION])
    clean = one(
        run(url, "base", rules), "cross_rule", "base.events x base.customers: events_after_signup"
    )
    assert clean.passed
    schema = broken(
        url, "UPDATE {s}.events SET occurred_at = TIMESTAMPTZ '2019-06-01' WHERE event_id < 4"
    )
    bad = one(
        run(url, schema, rules),
        "cross_rule",
        f"{schema}.events x {schema}.customers: events_after_signup",
    )
    assert not bad.passed and bad.found == "3 rows break it"
    typo = only("events", "customers", relations=[RELATION | {"rule": "events.no_such > 0"}])
    failed = one(
        run(url, "base", typo), "cross_rule", "base.events x base.customers: events_after_signup"
    )
    assert not failed.passed and failed.found.startswith("the check's query failed")


def test_a_relation_must_name_tables_and_columns_of_the_contract() -> None:
    with pytest.raises(ValueError, match="a table of the contract"):
        only("events", relations=[RELATION])


@pytest.mark.parametrize("table", sorted(DAY_OF))
def test_a_week_shifted_by_a_day_fails_every_day_of_the_window(url: str, table: str) -> None:
    day = DAY_OF[table]
    column = DATE_COLUMN[table]
    shift = {
        "usage_daily": "usage_date = usage_date + 1",
        "readings": "read_at = read_at + interval '1 day'",
        "events": "occurred_at = occurred_at + interval '1 day'",
    }[table]
    start, end = AS_OF - timedelta(days=14), AS_OF - timedelta(days=7)
    schema = broken(
        url, f"UPDATE {{s}}.{table} SET {shift} WHERE {day} >= '{start}' AND {day} < '{end}'"
    )
    results = run(url, schema, only(table))
    bad = one(results, "days_complete", f"{schema}.{table}.{column}")
    assert not bad.passed and f"{start}: 0 rows" in bad.found
    # the last day is intact: the old check saw nothing
    assert one(results, "daily_volume", f"{schema}.{table} on {LAST}").passed


def test_quiet_weekends_pass_as_volume_is_weekly_by_default(url: str) -> None:
    weekend = "extract(isodow FROM usage_date) IN (6, 7) AND customer_id > 4"
    schema = broken(url, f"DELETE FROM {{s}}.usage_daily WHERE {weekend}")
    spec = CONTRACT["tables"]["usage_daily"] | {"volume": VOLUME | {"weekly": False}}
    daily = one(
        run(url, schema, contract(tables={"usage_daily": spec})),
        "days_complete",
        f"{schema}.usage_daily.usage_date",
    )
    assert not daily.passed and "(0.20 x" in daily.found
    results = run(url, schema, only("usage_daily"))
    assert one(results, "days_complete", f"{schema}.usage_daily.usage_date").passed
    assert one(results, "daily_volume", f"{schema}.usage_daily on {LAST}").passed


def test_the_window_reaches_back_for_its_first_days_peers(url: str) -> None:
    """Each day of the window is judged against the same weekday of the 28 days before it,
    as its own night judged it: a table whose history starts inside those days compares
    only with the days it has."""
    results = run(url, "base", only("usage_daily", "events"))
    assert one(results, "days_complete", "base.usage_daily.usage_date").found == (
        "29 days, median 20 rows"
    )
    assert one(results, "days_complete", "base.events.occurred_at").passed  # 40 days of rows
    seen = sources.observe(url, "base", only("usage_daily"), AS_OF, "UTC")
    assert min(seen.days["usage_daily"]) == AS_OF - timedelta(days=30 + 28)


# -- references: a fact's key names a row of another table -------------------------------


def referencing(new_days: int = 1, **column: Any) -> contracts.Contract:
    """Events whose customer_id references the customers dimension."""
    events = copy.deepcopy(CONTRACT["tables"]["events"])
    events["columns"]["customer_id"] = {
        "type": "integer",
        "references": "customers.customer_id",
    } | column
    tables = {"events": events, "customers": CONTRACT["tables"]["customers"]}
    return contract(tables=tables, new_days=new_days)


def test_references_pass_when_every_key_names_a_row(url: str) -> None:
    result = one(run(url, "base", referencing()), "references", "base.events.customer_id")
    assert result.passed and result.found == "0 of 12 rows"
    assert f"rows dated {LAST} (new_days) in base.customers.customer_id" in result.expected
    assert "max_orphan_fraction" in result.expected


def test_orphans_on_the_new_day_fail_naming_table_column_and_keys(url: str) -> None:
    schema = broken(
        url,
        f"UPDATE {{s}}.events SET customer_id = customer_id + 100 "
        f"WHERE {DAY_OF['events']} = '{LAST}' AND customer_id <= 3",
    )
    results = run(url, schema, referencing())
    bad = one(results, "references", f"{schema}.events.customer_id")
    assert not bad.passed
    assert bad.found == (
        f"3 of 12 rows (25.00%) reference no {schema}.customers.customer_id: 101, 102, 103"
    )
    assert failures(results) == [bad.describe()]
    # customers deleted: their facts are orphans, the smallest keys named
    schema = broken(url, "DELETE FROM {s}.customers WHERE customer_id > 5")
    bad = one(run(url, schema, referencing()), "references", f"{schema}.events.customer_id")
    assert bad.found.endswith(
        f"7 of 12 rows (58.33%) reference no {schema}.customers.customer_id: "
        "6, 7, 8, 9, 10 and 2 more keys"
    )


def test_orphans_are_read_on_the_new_days_only(url: str) -> None:
    older = LAST - timedelta(days=3)
    schema = broken(
        url,
        f"UPDATE {{s}}.events SET customer_id = customer_id + 100 "
        f"WHERE {DAY_OF['events']} = '{older}' AND customer_id <= 2",
    )
    assert one(run(url, schema, referencing()), "references", f"{schema}.events.customer_id").passed
    week = one(
        run(url, schema, referencing(new_days=7)), "references", f"{schema}.events.customer_id"
    )
    assert not week.passed and week.found.startswith("2 of 84 rows (2.38%)")
    assert f"rows dated {AS_OF - timedelta(days=7)}..{LAST}" in week.expected


def test_orphans_under_their_limit_pass_and_nulls_are_no_orphans(url: str) -> None:
    schema = broken(
        url,
        f"UPDATE {{s}}.events SET customer_id = customer_id + 100 "
        f"WHERE {DAY_OF['events']} = '{LAST}' AND customer_id <= 3",
    )
    limited = one(
        run(url, schema, referencing(max_orphan_fraction=0.25)),
        "references",
        f"{schema}.events.customer_id",
    )
    assert limited.passed and limited.found.startswith("3 of 12 rows (25.00%)")
    nulls = broken(
        url, f"UPDATE {{s}}.events SET customer_id = NULL WHERE {DAY_OF['events']} = '{LAST}'"
    )
    results = run(url, nulls, referencing())
    assert one(results, "references", f"{nulls}.events.customer_id").passed
    assert not one(results, "null_fraction", f"{nulls}.events.customer_id").passed


def test_a_reference_to_a_missing_table_is_not_checked(url: str) -> None:
    schema = broken(url, "DROP TABLE {s}.customers")
    results = run(url, schema, referencing())
    assert [r.check for r in results if not r.passed] == ["table_exists"]
    assert not [r for r in results if r.check == "references"]


def test_rows_dated_on_the_run_date_fail_a_run_of_today(url: str) -> None:
    # today where the contract counts days: the server's clock in the contract's zone
    today = db.scalar(url, "SELECT CAST(now() AT TIME ZONE %s AS date)", (ZONE,))
    schema = broken(
        url,
        "CREATE TABLE {s}.live (id integer, at date); "
        f"INSERT INTO {{s}}.live SELECT g, DATE '{today}' - (g % 20) FROM generate_series(1, 200) g",
    )
    live = contract(
        tables={"live": {"date_column": "at", "columns": {"id": "integer", "at": "date"}}}
    )
    tonight = sources.check_sources(url, schema, live, today, "UTC")
    bad = one(tonight, "no_future_rows", f"{schema}.live.at")
    assert not bad.passed and f"on or after {today}" in bad.expected
    # a backfill of an earlier date sees later facts rightly
    earlier = sources.check_sources(url, schema, live, today - timedelta(days=5), "UTC")
    assert one(earlier, "no_future_rows", f"{schema}.live.at").passed


def test_rows_per_day_are_observed_and_rewritten_history_is_named() -> None:
    d = date(2024, 11, 1)
    before = {"events": {d + timedelta(days=i): (100, f"c{i}") for i in range(10)}}
    seen = d + timedelta(days=10)
    same = source_days.rewritten_days(before, seen, before, "wh", contract())
    assert [r.passed for r in same] == [True]
    late = {"events": dict(before["events"]) | {d + timedelta(days=3): (103, "x")}}
    warned = source_days.rewritten_days(before, seen, late, "wh", contract())[0]
    assert (warned.passed, warned.severity) == (False, "warn")
    assert f"{d + timedelta(days=3)}: 100 -> 103 rows" in warned.found
    rewritten = {"events": dict(before["events"]) | {d + timedelta(days=3): (150, "x")}}
    failed = source_days.rewritten_days(before, seen, rewritten, "wh", contract())[0]
    assert (failed.passed, failed.severity) == (False, "fail")
    assert "max_rewritten_fraction" in failed.expected
    # the same rows with other values: restated in place, named, a warning
    restated = {"events": dict(before["events"]) | {d + timedelta(days=2): (100, "other")}}
    found = source_days.rewritten_days(before, seen, restated, "wh", contract())[0]
    assert (found.passed, found.severity) == (False, "warn")
    assert f"{d + timedelta(days=2)}: 100 rows, content changed" in found.found
    assert "1 restated in place" in found.found
    # days before the table's lookback are not compared; days the earlier run had not yet
    # seen are new facts, not rewrites
    since = {"events": d + timedelta(days=3)}
    assert source_days.rewritten_days(before, seen, restated, "wh", contract(), since=since)[
        0
    ].passed
    newer = {"events": dict(before["events"]) | {d + timedelta(days=10): (999, "n")}}
    assert source_days.rewritten_days(before, seen, newer, "wh", contract())[0].passed


def test_history_is_kept_as_far_back_as_each_table_is_read(url: str) -> None:
    short = sources.observe(url, "base", contract(), AS_OF, "UTC")
    longer = sources.observe(
        url, "base", contract(), AS_OF, "UTC", history_days={"usage_daily": 400}
    )
    assert min(longer.days["usage_daily"]) < min(short.days["usage_daily"])
    # the evidence of a day is its rows and a fingerprint of their content
    rows, content = longer.days["usage_daily"][LAST]
    assert rows == 20 and isinstance(content, str) and content


def test_observe_counts_rows_per_day_of_each_dated_table(url: str) -> None:
    seen = sources.observe(url, "base", contract(), AS_OF, "UTC")
    assert set(seen.days) == {"usage_daily", "readings", "events"}
    assert seen.days["usage_daily"][LAST][0] == 20 and seen.days["events"][LAST][0] == 12


def test_the_checks_take_the_use_case_session_settings_and_name_a_refused_one(url: str) -> None:
    plain = sources.observe(url, "base", contract(), AS_OF).results
    settled = sources.observe(
        url, "base", contract(), AS_OF, session={"jit": "off", "work_mem": "64MB"}
    ).results
    assert [(r.check, r.target, r.passed, r.found) for r in settled] == [
        (r.check, r.target, r.passed, r.found) for r in plain
    ]
    with pytest.raises(ConfigError, match=r"warehouse.session.work_mem: PostgreSQL refused 'lots'"):
        sources.observe(url, "base", contract(), AS_OF, session={"work_mem": "lots"})
