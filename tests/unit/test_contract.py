"""Loading source contracts: both column forms, type families, and config errors that
name the file, the key, what was expected and what was found."""

from __future__ import annotations

import textwrap
from datetime import date
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.conf import contract as contracts
from pipeline.core.errors import ConfigError

CONTRACT = """
# The warehouse tables the use case's SQL reads.
window_days: 14
max_null_fraction: 0.02
timezone: America/New_York
tables:
  customers:
    date_column: signup_date
    unique: [customer_id]
    columns:
      customer_id: integer
      signup_date: date
      email: {type: text, max_null_fraction: 0.05}
  usage_daily:
    date_column: usage_date
    fresh: true
    volume: {min_ratio: 0.5, max_ratio: 2.0, trailing_days: 7}
    rules: ["minutes >= 0", "data_mb >= 0"]
    columns:
      usage_date: date
      minutes: integer
      data_mb: bigint
  invoice_lines:
    unique: [[invoice_id, line_no], line_id]
    columns:
      invoice_id: int8
      line_no: smallint
      line_id: bigint
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "contract.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_short_and_long_column_forms_and_defaults(tmp_path: Path) -> None:
    contract = contracts.load_contract(write(tmp_path, CONTRACT))
    customers = contract.tables["customers"]
    assert customers.columns["customer_id"].type == "integer"
    assert customers.columns["customer_id"].max_null_fraction is None
    assert customers.columns["email"].type == "text"
    assert contract.null_limit("customers", "email") == 0.05
    assert contract.null_limit("customers", "customer_id") == 0.02
    assert (contract.window_days, contract.timezone) == (14, "America/New_York")
    usage = contract.tables["usage_daily"]
    assert usage.fresh and usage.volume is not None
    assert (usage.volume.min_ratio, usage.volume.max_ratio, usage.volume.trailing_days) == (
        0.5,
        2.0,
        7,
    )
    assert usage.rules == ("minutes >= 0", "data_mb >= 0")
    assert not customers.fresh and customers.volume is None and customers.rules == ()


def test_unique_entries_are_columns_or_column_lists(tmp_path: Path) -> None:
    contract = contracts.load_contract(write(tmp_path, CONTRACT))
    assert contract.tables["customers"].unique == (("customer_id",),)
    assert contract.tables["invoice_lines"].unique == (("invoice_id", "line_no"), ("line_id",))


def test_defaults_of_a_minimal_contract(tmp_path: Path) -> None:
    contract = contracts.load_contract(
        write(tmp_path, "tables:\n  plans:\n    columns: {plan_id: integer}\n")
    )
    assert (contract.window_days, contract.max_null_fraction, contract.timezone) == (
        30,
        0.01,
        None,
    )
    assert contract.tables["plans"].date_column is None


def test_dated_tables_keep_contract_order_and_skip_dimensions(tmp_path: Path) -> None:
    contract = contracts.load_contract(write(tmp_path, CONTRACT))
    assert contracts.dated_tables(contract) == ["customers", "usage_daily"]


def test_contract_is_frozen(tmp_path: Path) -> None:
    contract = contracts.load_contract(write(tmp_path, CONTRACT))
    with pytest.raises(ValidationError):
        contract.window_days = 3  # type: ignore[misc]


def test_references_and_their_orphan_limit(tmp_path: Path) -> None:
    text = REFERENCING % "{type: bigint, references: customers.customer_id}"
    text += "      amount: {type: numeric, max_null_fraction: 0.1}\n"
    contract = contracts.load_contract(write(tmp_path, text))
    key = contract.tables["orders"].columns["customer_id"]
    assert key.referenced == ("customers", "customer_id")
    assert key.max_orphan_fraction == 0.0  # any orphan on a new day fails
    assert contract.tables["orders"].columns["amount"].referenced is None
    assert contract.new_days == 1
    limited = REFERENCING % (
        "{type: integer, references: customers.customer_id, max_orphan_fraction: 0.001}"
    )
    contract = contracts.load_contract(write(tmp_path, limited + "new_days: 3\n"))
    assert contract.tables["orders"].columns["customer_id"].max_orphan_fraction == 0.001
    assert contract.new_days == 3


def test_volume_defaults_and_the_default_calendar(tmp_path: Path) -> None:
    contract = contracts.load_contract(
        write(tmp_path, VALID_TABLE.replace("date_column:", "volume: {}\n    date_column:"))
    )
    volume = contract.tables["usage_daily"].volume
    assert volume is not None
    assert (volume.min_ratio, volume.max_ratio, volume.trailing_days) == (0.4, 1.7, 28)
    assert volume.weekly and volume.noise_sd == 4
    # Christmas and New Year days have their own bounds every year; other days none
    for day in (date(2024, 12, 24), date(2025, 12, 25), date(2026, 12, 26), date(2027, 1, 1)):
        assert volume.bounds(day) == (0.0, 3.0)
    assert volume.bounds(date(2024, 12, 23)) is None


def test_a_calendar_of_ones_own_replaces_the_default(tmp_path: Path) -> None:
    text = VALID_TABLE.replace(
        "date_column:",
        "volume:\n"
        "      min_ratio: 0.5\n"
        "      calendar:\n"
        '        - {days: ["05-01", "2025-04-18"], min_ratio: 0}\n'
        '        - {days: "2025-05-01", max_ratio: 4}\n'
        "    date_column:",
    )
    volume = contracts.load_contract(write(tmp_path, text)).tables["usage_daily"].volume
    assert volume is not None
    assert volume.bounds(date(2025, 4, 18)) == (0.0, 1.7)  # a bound left out is the table's
    assert volume.bounds(date(2026, 5, 1)) == (0.0, 1.7)  # every year
    assert volume.bounds(date(2025, 5, 1)) == (0.5, 4.0)  # a dated entry beats a yearly one
    assert volume.bounds(date(2025, 12, 25)) is None  # the default calendar is replaced
    none = VALID_TABLE.replace("date_column:", "volume: {calendar: []}\n    date_column:")
    volume = contracts.load_contract(write(tmp_path, none)).tables["usage_daily"].volume
    assert volume is not None and volume.bounds(date(2025, 12, 25)) is None


@pytest.mark.parametrize(
    ("declared", "data_type", "accepted"),
    [
        ("integer", "smallint", True),
        ("integer", "integer", True),
        ("integer", "bigint", True),
        ("integer", "numeric", False),
        ("integer", "text", False),
        ("number", "double precision", True),
        ("number", "numeric", True),
        ("number", "bigint", True),
        ("number", "text", False),
        ("text", "character varying", True),
        ("text", "character", True),
        ("text", "integer", False),
        ("date", "date", True),
        ("date", "timestamp without time zone", False),
        ("timestamp", "timestamp without time zone", True),
        ("timestamp", "timestamp with time zone", True),
        ("timestamp", "date", False),
        ("timestamptz", "timestamp with time zone", True),
        ("timestamptz", "timestamp without time zone", False),
        ("boolean", "boolean", True),
        ("boolean", "integer", False),
        # anything else is an exact data_type name
        ("bigint", "bigint", True),
        ("bigint", "integer", False),
        ("numeric", "numeric", True),
        ("numeric", "double precision", False),
        ("double precision", "double precision", True),
        ("jsonb", "jsonb", True),
        ("jsonb", "json", False),
        ("timestamp with time zone", "timestamp with time zone", True),
        ("timestamp without time zone", "timestamp with time zone", False),
        ("USER-DEFINED", "USER-DEFINED", True),
        # PostgreSQL's short spellings
        ("varchar", "character varying", True),
        ("int8", "bigint", True),
        ("int8", "integer", False),
        ("float8", "double precision", True),
        ("some_custom_type", "text", False),
    ],
)
def test_type_families(declared: str, data_type: str, accepted: bool) -> None:
    assert contracts.type_matches(declared, data_type) is accepted


VALID_TABLE = """
tables:
  usage_daily:
    date_column: usage_date
    columns: {usage_date: date, minutes: integer}
"""

REFERENCING = """
tables:
  customers:
    columns: {customer_id: integer, email: text}
  orders:
    date_column: ordered_on
    columns:
      ordered_on: date
      customer_id: %s
"""

# (file text, key path, expected, found)
CONFIG_ERRORS = {
    "unknown key": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            freshh: true
            columns: {usage_date: date}
        """,
        "tables.usage_daily.freshh",
        "one of the keys columns, date_column, fresh, volume, unique, not_null, rules",
        "unknown key 'freshh'",
    ),
    "unknown top-level key": (
        VALID_TABLE + "window: 30\n",
        "window",
        "one of the keys tables, window_days, max_null_fraction, timezone",
        "unknown key 'window'",
    ),
    "unknown column key": (
        """
        tables:
          t:
            columns: {a: {type: text, max_nulls: 0.5}}
        """,
        "tables.t.columns.a.max_nulls",
        "one of the keys type, max_null_fraction",
        "unknown key 'max_nulls'",
    ),
    "wrong type for a number": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            volume: {min_ratio: half, max_ratio: 2.0}
            columns: {usage_date: date}
        """,
        "tables.usage_daily.volume.min_ratio",
        "a valid number",
        "'half'",
    ),
    "fractional window": (
        VALID_TABLE + "window_days: 7.5\n",
        "window_days",
        "a valid integer",
        "7.5",
    ),
    "null fraction above one": (
        VALID_TABLE + "max_null_fraction: 5\n",
        "max_null_fraction",
        "a value less than or equal to 1",
        "5",
    ),
    "date_column not in columns": (
        """
        tables:
          usage_daily:
            date_column: created_at
            columns: {usage_date: date, minutes: integer}
        """,
        "tables.usage_daily.date_column",
        "one of the columns listed under columns (usage_date, minutes)",
        "'created_at'",
    ),
    "date_column not a date": (
        """
        tables:
          usage_daily:
            date_column: minutes
            columns: {usage_date: date, minutes: integer}
        """,
        "tables.usage_daily.date_column",
        "a column of type date, timestamp or timestamptz",
        "minutes of type integer",
    ),
    "fresh without date_column": (
        """
        tables:
          customers:
            fresh: true
            columns: {customer_id: integer}
        """,
        "tables.customers.fresh",
        "a date_column for the freshness check",
        "fresh: true",
    ),
    "volume without date_column": (
        """
        tables:
          customers:
            volume: {min_ratio: 0.5, max_ratio: 2}
            columns: {customer_id: integer}
        """,
        "tables.customers.volume",
        "a date_column for the volume check",
        "volume",
    ),
    "max_ratio below min_ratio": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            volume: {min_ratio: 2, max_ratio: 0.5}
            columns: {usage_date: date}
        """,
        "tables.usage_daily.volume.max_ratio",
        "a number >= min_ratio (2.0)",
        "0.5",
    ),
    "unique column not declared": (
        """
        tables:
          lines:
            unique: [[invoice_id, line_no]]
            columns: {invoice_id: bigint}
        """,
        "tables.lines.unique[0]",
        "columns listed under columns (invoice_id)",
        "line_no",
    ),
    "unique entry not a column": (
        """
        tables:
          lines:
            unique: [[]]
            columns: {invoice_id: bigint}
        """,
        "tables.lines.unique[0]",
        "a column name or a non-empty list of column names",
        "[]",
    ),
    "column type not a string": (
        """
        tables:
          t:
            columns: {a: 5}
        """,
        "tables.t.columns.a",
        "a type name or a mapping {type, max_null_fraction}",
        "5",
    ),
    "reference to a table not in the contract": (
        REFERENCING % "{type: bigint, references: clients.customer_id}",
        "tables.orders.columns.customer_id.references",
        "a table of the contract (customers, orders)",
        "'clients'",
    ),
    "reference to a column not in the table": (
        REFERENCING % "{type: bigint, references: customers.id}",
        "tables.orders.columns.customer_id.references",
        "a column of customers (customer_id, email)",
        "'id'",
    ),
    "reference to a column of another type": (
        REFERENCING % "{type: bigint, references: customers.email}",
        "tables.orders.columns.customer_id.references",
        "a column whose type compares with customer_id's (bigint)",
        "customers.email of type text",
    ),
    "reference without a column": (
        REFERENCING % "{type: integer, references: customers}",
        "tables.orders.columns.customer_id.references",
        "<table>.<column>, e.g. members.member_id",
        "'customers'",
    ),
    "orphan limit without a reference": (
        REFERENCING % "{type: integer, max_orphan_fraction: 0.01}",
        "tables.orders.columns.customer_id.max_orphan_fraction",
        "references: <table>.<column> beside max_orphan_fraction",
        "no references",
    ),
    "orphan limit above one": (
        REFERENCING % "{type: integer, references: customers.customer_id, max_orphan_fraction: 2}",
        "tables.orders.columns.customer_id.max_orphan_fraction",
        "a value less than or equal to 1",
        "2",
    ),
    "new_days below one": (
        VALID_TABLE + "new_days: 0\n",
        "new_days",
        "a value greater than or equal to 1",
        "0",
    ),
    "calendar day not a day": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            volume: {calendar: [{days: ["12-24", "12-32"], min_ratio: 0}]}
            columns: {usage_date: date}
        """,
        "tables.usage_daily.volume.calendar[0].days[1]",
        "a day as MM-DD (every year) or YYYY-MM-DD (that date)",
        "'12-32'",
    ),
    "calendar entry without bounds": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            volume: {calendar: [{days: ["2025-04-18"]}]}
            columns: {usage_date: date}
        """,
        "tables.usage_daily.volume.calendar[0]",
        "min_ratio or max_ratio (the bounds of these days)",
        "neither",
    ),
    "calendar entry's bounds reversed": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            volume: {calendar: [{days: "12-26", min_ratio: 3, max_ratio: 1}]}
            columns: {usage_date: date}
        """,
        "tables.usage_daily.volume.calendar[0].max_ratio",
        "a number >= min_ratio (3.0)",
        "1",
    ),
    "unknown calendar key": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            volume: {calendar: [{dates: ["12-24"], min_ratio: 0}]}
            columns: {usage_date: date}
        """,
        "tables.usage_daily.volume.calendar[0].dates",
        "one of the keys days, min_ratio, max_ratio",
        "unknown key 'dates'",
    ),
    "weekly volume over less than a week": (
        """
        tables:
          usage_daily:
            date_column: usage_date
            volume: {trailing_days: 5}
            columns: {usage_date: date}
        """,
        "tables.usage_daily.volume.trailing_days",
        "at least 7 days when weekly (the default) compares a day with its weekday",
        "5",
    ),
    "empty tables": ("tables: {}\n", "tables", "at least one table", "{}"),
    "no tables key": ("window_days: 30\n", "tables", "the key 'tables'", "no such key"),
    "table without columns": (
        "tables:\n  t: {columns: {}}\n",
        "tables.t.columns",
        "at least one column",
        "{}",
    ),
    "unknown timezone": (
        VALID_TABLE + "timezone: Mars/Olympus_Mons\n",
        "timezone",
        "an IANA time zone name",
        "'Mars/Olympus_Mons'",
    ),
    "bad YAML syntax": (
        "tables:\n  usage_daily:\n    columns: {usage_date: date}\n   date_column: usage_date\n",
        "line 4, column 4",
        "valid YAML",
        "this YAML error: expected <block end>",
    ),
    "unclosed bracket": (
        "tables:\n  usage_daily: {columns: [usage_date: date\n",
        "line 3, column 1",
        "valid YAML",
        "this YAML error: expected ',' or ']'",
    ),
    "key given twice": (
        "tables:\n  t: {columns: {a: text}}\n  t: {columns: {b: text}}\n",
        "line 3, column 3",
        "valid YAML",
        "this YAML error: key 't' given twice",
    ),
    "not a mapping": (
        "- tables\n",
        "(top level)",
        "a mapping with the keys tables, window_days, max_null_fraction, timezone",
        "['tables']",
    ),
    "empty file": ("\n", "(top level)", "a mapping", "an empty file"),
}


@pytest.mark.parametrize(
    ("text", "key", "expected", "found"), list(CONFIG_ERRORS.values()), ids=list(CONFIG_ERRORS)
)
def test_config_errors_name_file_key_expected_and_found(
    tmp_path: Path, text: str, key: str, expected: str, found: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        contracts.load_contract(path)
    message = str(raised.value)
    assert str(path) in message
    assert f"{key}:" in message or f"{key}," in message
    assert f"expected {expected}" in message
    assert f"found {found}" in message


def test_every_problem_of_a_file_is_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        window_days: soon
        tables:
          t:
            colums: {a: text}
        """,
    )
    with pytest.raises(ConfigError) as raised:
        contracts.load_contract(path)
    lines = str(raised.value).splitlines()
    assert any("window_days: expected a valid integer, found 'soon'" in line for line in lines)
    assert any("tables.t.colums: expected one of the keys" in line for line in lines)
    assert any("tables.t.columns: expected the key 'columns'" in line for line in lines)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: expected a readable YAML file"):
        contracts.load_contract(path)
